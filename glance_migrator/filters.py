"""`run`'s choice of images: which ones it takes and in what order (discovery applies it)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final


class Order(StrEnum):
    NAME = "name"
    SMALLEST = "smallest"  # small images first: the most images done soonest
    LARGEST = "largest"
    OLDEST = "oldest"


@dataclass(frozen=True)
class Filters:
    """Which images a run takes (`run --owner --visibility --name --exclude --min-size --max-size --limit --order`)."""

    owners: tuple[str, ...] = ()
    visibilities: tuple[str, ...] = ()
    names: tuple[str, ...] = ()  # globs
    exclude: tuple[str, ...] = ()  # UUIDs or name globs
    min_size: int | None = None
    max_size: int | None = None
    limit: int | None = None
    order: Order | None = None

    def accepts(self, image: dict[str, Any]) -> bool:
        name, size = image.get("name") or "", image.get("size")
        return (
            (not self.owners or image.get("owner") in self.owners)
            and (not self.visibilities or image.get("visibility") in self.visibilities)
            and (not self.names or any(fnmatch.fnmatchcase(name, glob) for glob in self.names))
            and not any(image["id"] == ex or fnmatch.fnmatchcase(name, ex) for ex in self.exclude)
            and (self.min_size is None or (size is not None and size >= self.min_size))
            and (self.max_size is None or (size is not None and size <= self.max_size))
        )

    def sort_key(self, image: dict[str, Any]) -> tuple[Any, ...]:
        """Where `order` (which must be set) puts the image (then by id, so that equal keys keep one order)."""
        assert self.order is not None
        size = image.get("size") or 0
        first = {
            Order.NAME: image.get("name") or "",
            Order.SMALLEST: size,
            Order.LARGEST: -size,
            Order.OLDEST: image.get("created_at") or "",
        }
        return first[self.order], image["id"]


NO_FILTERS: Final = Filters()  # every image, as listed
