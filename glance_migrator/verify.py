"""Checks at the trust boundary: is the image Glance shows now the image we recorded at discovery?"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from glance_migrator.errors import IntegrityFailure
from glance_migrator.models import ImageRow

FINGERPRINT_FIELDS = ("size", "checksum", "os_hash_algo", "os_hash_value")


def fingerprint(image: dict[str, Any]) -> dict[str, Any]:
    return {key: image.get(key) for key in FINGERPRINT_FIELDS}


def check_unchanged(row: ImageRow, image: dict[str, Any], when: str) -> None:
    """Raise IntegrityFailure if size or any hash differs from what discovery recorded."""
    recorded = {key: getattr(row, key) for key in FINGERPRINT_FIELDS}
    now = fingerprint(image)
    diffs = [f"{key} {recorded[key]!r} -> {now[key]!r}" for key in FINGERPRINT_FIELDS if recorded[key] != now[key]]
    if diffs:
        raise IntegrityFailure(f"{when}: image data fingerprint changed since discovery: " + "; ".join(diffs))


def has_fingerprint(image: dict[str, Any]) -> bool:
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
