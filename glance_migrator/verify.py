"""Checks at the trust boundary: is the image Glance shows now the image we recorded at discovery?"""

from __future__ import annotations

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
