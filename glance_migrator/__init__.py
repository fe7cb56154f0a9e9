"""glance-migrator: move every Glance image's data to a new store, resumably and verifiably."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("glance-migrator")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
