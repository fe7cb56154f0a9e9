"""Checks at the trust boundary: is the image Glance shows now the image we recorded at discovery?"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glance_migrator.errors import IntegrityFailure
from glance_migrator.models import ImageRow

FINGERPRINT_FIELDS = ("size", "checksum", "os_hash_algo", "os_hash_value")


def fingerprint(image: Mapping[str, Any]) -> dict[str, Any]:
    return {key: image.get(key) for key in FINGERPRINT_FIELDS}


def recorded(row: ImageRow) -> dict[str, Any]:
    """What discovery recorded of the image's data."""
    return {key: getattr(row, key) for key in FINGERPRINT_FIELDS}


def differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Evidence that `now` describes other bytes than `before`, comparing what is comparable.

    Size always; the md5 `checksum` when `before` has one; the multihash when both name the same algorithm.
    Images from before Rocky have md5 only, and Glance computes the multihash with its current
    `hashing_algorithm` whenever it writes data (a copy-image, location-swap's copy), so a multihash that
    appears, or one of another algorithm, is new information, not a change. A hash that disappears is a
    change. At least one hash must be comparable: size alone proves nothing.
    """
    problems = []
    if before.get("size") != now.get("size"):
        problems.append(f"size {before.get('size')!r} -> {now.get('size')!r}")
    comparable = False
    if before.get("checksum"):
        comparable = True
        if now.get("checksum") != before["checksum"]:
            problems.append(f"checksum (md5) {before['checksum']!r} -> {now.get('checksum')!r}")
    if before.get("os_hash_value") and now.get("os_hash_algo") in (before.get("os_hash_algo"), None):
        comparable = True
        if now.get("os_hash_value") != before["os_hash_value"]:
            problems.append(
                f"os_hash_value ({before.get('os_hash_algo')}) {before['os_hash_value']!r} -> "
                f"{now.get('os_hash_value')!r}"
            )
    if not comparable and not problems:
        problems.append(
            f"no hash to compare: the record has {_hashes(before) or 'none'}, Glance now shows {_hashes(now) or 'none'}"
        )
    return problems


def new_hashes(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """What Glance computed that the record lacked (a multihash for an md5-only image, or one of its current
    algorithm), as a note for the event log; "" when nothing is new."""
    algo, value = now.get("os_hash_algo"), now.get("os_hash_value")
    if not value or (algo == before.get("os_hash_algo") and value == before.get("os_hash_value")):
        return ""
    had = _hashes(before)
    return f"Glance computed a new {algo} hash of the data (the record had {had or 'no hash'})"


def _hashes(image: Mapping[str, Any]) -> str:
    found = [f"{image.get('os_hash_algo')}" if image.get("os_hash_value") else ""]
    found.append("md5" if image.get("checksum") else "")
    return " and ".join(f for f in found if f)


def check_unchanged(row: ImageRow, image: Mapping[str, Any], when: str) -> str:
    """Raise IntegrityFailure if the image's data as Glance describes it now is not the data discovery recorded
    (see `differences`). Returns a note of the hashes Glance computed since (see `new_hashes`), or ""."""
    problems = differences(recorded(row), image)
    if problems:
        raise IntegrityFailure(f"{when}: image data fingerprint changed since discovery: " + "; ".join(problems))
    return new_hashes(recorded(row), image)


def has_fingerprint(image: Mapping[str, Any]) -> bool:
    """An image can only be verified if Glance recorded a size and at least one hash for it."""
    return image.get("size") is not None and bool(image.get("os_hash_value") or image.get("checksum"))


class DataHasher:
    """Hashes bytes as they stream by, with Glance's two algorithms: md5 (`checksum`) and the multihash."""

    def __init__(self, algo: str | None) -> None:
        self.algo = algo or "sha512"
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.multihash = hashlib.new(self.algo)
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.md5.update(chunk)
        self.multihash.update(chunk)
        self.size += len(chunk)

    def check(self, row: ImageRow, when: str) -> None:
        """Raise IntegrityFailure unless the bytes seen are the bytes Glance recorded for the image."""
        problems = []
        if row.size is not None and self.size != row.size:
            problems.append(f"size {self.size} != recorded {row.size}")
        if row.os_hash_value and self.multihash.hexdigest() != row.os_hash_value:
            problems.append(f"{self.algo} differs from the recorded os_hash_value")
        if row.checksum and self.md5.hexdigest() != row.checksum:
            problems.append("md5 differs from the recorded checksum")
        if problems:
            raise IntegrityFailure(f"{when}: the data does not match Glance's record: " + "; ".join(problems))


def hash_file(path: Path, algo: str | None) -> DataHasher:
    hasher = DataHasher(algo)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher
