"""glance-migrator: move every Glance image's data to a new store, resumably and verifiably."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # Read from the installed package's metadata when asked (--version), not by every command at start-up:
    # importlib.metadata costs a few hundredths of a second.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("glance-migrator")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"
