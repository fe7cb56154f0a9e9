"""formats.refusal: what Glance's format check (Glance 30 on, oslo.utils' inspector) says against an image's first
bytes, by Glance's own rule (glance/location.py, ImageProxy.set_data)."""

from __future__ import annotations

import pytest

from glance_migrator.formats import HEAD, head_of, refusal
from tests.corpus import QCOW2_HEADER
from tests.glancetools import noise

QCOW2 = QCOW2_HEADER + bytes(256 * 1024)  # a real (empty) qcow2 v3 image's header, zeros after it
RAW = noise(256 * 1024)


@pytest.mark.parametrize(
    ("disk_format", "data", "refused"),
    [
        ("qcow2", QCOW2, None),
        ("qcow2", RAW, "Image disk_format qcow2 does not match stream data raw"),
        ("vmdk", RAW, "Image disk_format vmdk does not match stream data raw"),
        ("iso", RAW, "Image disk_format iso does not match stream data raw"),
        ("raw", RAW, None),
        ("raw", QCOW2, None),  # Glance lets an image that claims raw through, whatever it holds (a warning)
        ("ami", RAW, None),  # not an inspectable format: nothing recognised is fine
    ],
)
def test_glance_rule_on_the_first_bytes(disk_format: str, data: bytes, refused: str | None) -> None:
    assert refusal({"container_format": "bare", "disk_format": disk_format}, data) == refused


def test_only_bare_images_are_inspected() -> None:
    assert refusal({"container_format": "ovf", "disk_format": "qcow2"}, RAW) is None


def test_head_of_a_download_stops_after_the_first_mib() -> None:
    chunks = iter([b"a" * (HEAD // 2), b"b" * HEAD, b"never read"])
    head = head_of(chunks)
    assert len(head) == HEAD and head.endswith(b"b")
    assert next(chunks) == b"never read"
