"""The trust-boundary check: any change of size or hash since discovery is an integrity failure."""

from __future__ import annotations

import hashlib
import os

import pytest

from glance_migrator.errors import IntegrityFailure
from glance_migrator.glance import redact
from glance_migrator.models import ImageRow
from glance_migrator.spool import HashingReader
from glance_migrator.verify import check_unchanged, has_fingerprint

RECORD = {"size": 10, "checksum": "a" * 32, "os_hash_algo": "sha512", "os_hash_value": "b" * 128}


def _row() -> ImageRow:
    return ImageRow(image_id="x", **RECORD)


def test_identical_fingerprint_passes() -> None:
    check_unchanged(_row(), {**RECORD, "stores": "new"}, "after copy")


@pytest.mark.parametrize("field", sorted(RECORD))
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


@pytest.mark.parametrize("read_size", [1, 7, 16384, 100_000, -1])
def test_hashing_reader_yields_every_byte_once_and_hashes_them(read_size: int) -> None:
    data = os.urandom(3_000_017)
    chunks = iter([data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)])
    reader = HashingReader(chunks, len(data), "sha512")
    out = bytearray()
    while piece := reader.read(read_size):
        out += piece
    assert bytes(out) == data and len(reader) == len(data)
    assert reader.hasher.multihash.hexdigest() == hashlib.sha512(data).hexdigest()
    assert reader.hasher.md5.hexdigest() == hashlib.md5(data, usedforsecurity=False).hexdigest()
