"""The trust-boundary check: a change of size or of a comparable hash since discovery is an integrity failure;
a hash Glance computed since (md5-only images, another algorithm) is not."""

from __future__ import annotations

import hashlib
import os

import pytest

from glance_migrator.errors import IntegrityFailure
from glance_migrator.models import ImageRow
from glance_migrator.redaction import redact
from glance_migrator.spool import HashingStream
from glance_migrator.verify import check_unchanged, differences, has_fingerprint, new_hashes

RECORD = {"size": 10, "checksum": "a" * 32, "os_hash_algo": "sha512", "os_hash_value": "b" * 128}


def _row() -> ImageRow:
    return ImageRow(image_id="x", **RECORD)


def test_identical_fingerprint_passes() -> None:
    check_unchanged(_row(), {**RECORD, "stores": "new"}, "after copy")


@pytest.mark.parametrize("field", ["checksum", "os_hash_value", "size"])  # os_hash_algo: see below
def test_any_changed_field_is_an_integrity_failure(field: str) -> None:
    changed = {**RECORD, field: "different"}
    with pytest.raises(IntegrityFailure, match=f"after copy: .*{field}"):
        check_unchanged(_row(), changed, "after copy")


def test_images_without_size_or_hash_cannot_be_verified() -> None:
    assert has_fingerprint(RECORD)
    assert not has_fingerprint({**RECORD, "size": None})
    assert not has_fingerprint({**RECORD, "checksum": None, "os_hash_value": None})
    assert has_fingerprint({**RECORD, "os_hash_value": None})  # pre-Rocky images: md5 only


def test_credentials_in_location_urls_are_redacted() -> None:
    text = (
        "Invalid location: s3://key:secret@127.0.0.1:8333/glance/x, swift+https://u:k@h/v1, "
        '{"url": "rbd://fsid/images/x/snap"} s3+http://127.0.0.1:8333/glance/y; see https://admin:pw@host/path'
    )
    assert redact(text) == (
        'Invalid location: s3://***, swift+https://***, {"url": "rbd://***"} s3+http://***; see https://***@host/path'
    )


def test_a_hashing_stream_passes_each_chunk_on_once_and_hashes_them() -> None:
    data = os.urandom(3_000_017)
    chunks = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    stream = HashingStream(iter(chunks), len(data), "sha512")
    out = list(stream)
    assert len(out) == len(chunks) and all(a is b for a, b in zip(out, chunks, strict=True))  # not copied
    assert len(stream) == len(data)
    assert stream.hasher.multihash.hexdigest() == hashlib.sha512(data).hexdigest()
    assert stream.hasher.md5.hexdigest() == hashlib.md5(data, usedforsecurity=False).hexdigest()


MD5 = "d41d8cd98f00b204e9800998ecf8427e"
SHA512 = hashlib.sha512(b"").hexdigest()
SHA256 = hashlib.sha256(b"").hexdigest()


def _image(size: int = 0, checksum: str | None = MD5, algo: str | None = "sha512", value: str | None = SHA512):
    return {"size": size, "checksum": checksum, "os_hash_algo": algo, "os_hash_value": value}


@pytest.mark.parametrize(
    ("before", "now", "note"),
    [
        (_image(), _image(), ""),  # unchanged
        (_image(algo=None, value=None), _image(), "new sha512 hash"),  # pre-Rocky md5 only; Glance filled it in
        (_image(algo="sha256", value=SHA256), _image(), "new sha512 hash"),  # an older hashing_algorithm
        (_image(checksum=None), _image(checksum=MD5), ""),  # md5 appeared: the multihash still compares
    ],
)
def test_what_glance_computed_since_is_new_information_not_corruption(before, now, note) -> None:
    assert differences(before, now) == []
    assert (note in new_hashes(before, now)) if note else new_hashes(before, now) == ""


@pytest.mark.parametrize(
    ("before", "now", "problem"),
    [
        (_image(), _image(size=1), "size 0 -> 1"),
        (_image(algo=None, value=None), _image(checksum="0" * 32), "checksum (md5)"),
        (_image(), _image(value="f" * 128), "os_hash_value (sha512)"),
        (_image(), _image(algo=None, value=None), "os_hash_value (sha512)"),  # a hash that disappears
        (_image(), _image(checksum=None), "checksum (md5)"),
        # nothing in common: the record's sha256 against a sha512 and no md5 on either side
        (_image(checksum=None, algo="sha256", value=SHA256), _image(checksum=None), "no hash to compare"),
    ],
)
def test_a_change_in_what_is_comparable_is_reported(before, now, problem) -> None:
    problems = differences(before, now)
    assert problems and problem in problems[0], problems
