"""Will Glance accept this image's data as its disk_format says? Asked with Glance's own format inspector.

From 2025.1 (Glance 30) Glance inspects every upload and every copy of a `bare` image (glance/location.py,
ImageProxy.set_data) with oslo.utils' format_inspector, and with `[image_format] require_image_format_match`
on (the default) it refuses data that is not what `disk_format` says (unless disk_format is `raw`, or a format
it cannot inspect, such as `ami`) and data that fails its format's safety checks (a qcow2 with a backing or
data file, a VMDK with extents elsewhere, a GPT that lies...). Images uploaded years before that check can be
refused now, by both strategies: an upload answers 415, a copy-image task fails ("Task failed due to Internal
Error" on Glance 33, the reason only in glance-api's log). The same inspector, run here on the first MiB of
the data, names the reason, so such an image fails with kind "format" instead of as corrupt, and the plan
(`run --dry-run --inspect-formats`) can find them before a run. Both are predictions from the first MiB with
this host's oslo.utils: Glance's answer is the one that counts.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any, Final

from glance_migrator.glance import Glance, GlanceHTTPError

HEAD: Final = 1 << 20  # bytes of an image's data inspected: every header the inspectors read lies within it
FORMAT: Final = "format"  # error_kind of an image whose data Glance's format check refuses
ADVICE: Final = (
    "its data was uploaded before Glance checked formats. If the data is right, correct the image's disk_format "
    "(`openstack image set --disk-format ...`); or turn `[image_format] require_image_format_match` off on "
    "glance-api for the migration (Glance 30 and later); then `glance-migrator retry`"
)


def head_of(chunks: Iterable[bytes]) -> bytes:
    """The first HEAD bytes of a download's chunks (the caller closes the download)."""
    head = bytearray()
    for chunk in chunks:
        head += chunk
        if len(head) >= HEAD:
            break
    return bytes(head[:HEAD])


def refusal_of(glance: Glance, image: Mapping[str, Any]) -> str | None:
    """`refusal` of the image's data as Glance serves it (its first HEAD bytes); None also when it cannot be read."""
    if image.get("container_format") != "bare":
        return None  # Glance inspects bare images only: nothing to download
    try:
        with glance.download(image["id"]) as chunks:
            return refusal(image, head_of(chunks))
    except GlanceHTTPError:
        return None


def refusal(image: Mapping[str, Any], head: bytes) -> str | None:
    """What Glance's format check would say against the image's data (`head`: its first bytes, or all of it);
    None when it would let it through, or when the first bytes cannot tell."""
    if image.get("container_format") != "bare":
        return None  # Glance inspects bare images only
    from oslo_utils.imageutils import format_inspector  # noqa: PLC0415 - a twentieth of a second at start-up

    disk_format = str(image.get("disk_format"))
    wrapper = format_inspector.InspectWrapper(io.BytesIO(head))
    try:
        while wrapper.read(64 * 1024):
            pass
    finally:
        wrapper.close()
    try:
        found = {str(inspector): inspector for inspector in wrapper.formats or []}
        # An ISO with a GPT boot sector is an ISO (as Glance decides); several formats at once are refused.
        inspector = found["iso"] if set(found) == {"iso", "gpt"} else wrapper.format
        problem = None
        if inspector is not None and not _accepted(str(inspector), disk_format):
            problem = f"Image disk_format {disk_format} does not match stream data {inspector}"
        elif inspector is not None:
            inspector.safety_check()
    except format_inspector.ImageFormatError as e:
        problem = f"format inspection: {e}"
    except format_inspector.SafetyCheckFailed as e:
        problem = f"Image failed safety checks ({e})"
    except Exception:  # noqa: BLE001 - an inspector that cannot decide from the first MiB: Glance will say
        problem = None
    return problem


def _accepted(detected: str, disk_format: str) -> bool:
    """Glance's rule: the format it found is the one declared; or it found nothing it knows and the declared
    one is not inspectable (ami...); or the image claims raw (then anything goes, with a warning)."""
    from oslo_utils.imageutils import format_inspector  # noqa: PLC0415

    return (
        detected == disk_format
        or (detected == "raw" and disk_format not in format_inspector.ALL_FORMATS)
        or disk_format == "raw"
    )
