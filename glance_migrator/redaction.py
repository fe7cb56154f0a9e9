"""What no log line, message or record shows: store location URLs and the credentials in URLs."""

from __future__ import annotations

import logging
import re
from typing import Final

_URL_CREDENTIALS: Final = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
# Store location URLs: older glance_stores put S3 keys and Swift passwords in them, and all of them name the
# backend's internals (Ceph fsid and pool, buckets, volumes). Shown whole to nobody.
_STORE_LOCATION: Final = re.compile(
    r"\b((?:rbd|s3(?:\+https?)?|swift(?:\+https?|\+config)?|cinder|vsphere)://)[^\s\"'<>,;]+", re.IGNORECASE
)


def redact(text: str) -> str:
    """Hide store location URLs (rbd://, s3://, swift://...) and credentials in any other URL
    (https://user:password@...) before text is logged, shown or stored."""
    return _URL_CREDENTIALS.sub(r"\1***@", _STORE_LOCATION.sub(r"\1***", text))


class RedactingFilter(logging.Filter):
    """Applied to every log handler: at -v, keystoneauth logs whole Glance responses, locations included."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
