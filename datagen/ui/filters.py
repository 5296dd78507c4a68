"""The run page's item filters and paging, parsed from the query string (pure; a bad value is a BadFilter → 400)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

PAGE_SIZE = 50
"""Items per page; paging is keyset (id > last seen), so page 2,000 of 100k items costs what page 1 does."""
MAX_ID = 2**31 - 1
"""The largest id every store can hold: PostgreSQL's primary keys are `integer` (SQLite's reach 2^63-1, but a larger
number sent to PostgreSQL is an error, not a miss). A larger id in a URL is a 404 or a 400, never a 500."""
STATUSES = ("all", "accepted", "rejected")
CLASSIFICATIONS = ("all", "yes", "no", "unknown")
ORDERS = ("asc", "desc")
DEGENERATE = ("all", "yes", "no")
CURATION = ("all", "kept", "dropped")


class BadFilter(ValueError):
    """A filter value that cannot be used; the message names the parameter and is shown on the 400 page."""


@dataclass(frozen=True)
class ItemFilter:
    status: str = "all"
    reason: str | None = None
    min_similarity: float | None = None
    max_similarity: float | None = None
    classification: str = "all"
    search: str | None = None
    after: int | None = None
    """Show items with id greater than this (the next page)."""
    before: int | None = None
    """Show the items just before this id (the previous page)."""
    sort: str = "id"
    """The column the items are ordered by (one of the sort keys the page offers; ties in id order)."""
    order: str = "asc"
    """asc or desc. Items with no value for the sort column come last either way."""
    min_ifd: float | None = None
    """Instructions with an instance whose IFD under the student (`datagen score`) is at least this."""
    max_ifd: float | None = None
    degenerate: str = "all"
    """yes: an instance is degenerate (repeats or was cut); no: none is."""
    curation: str = "all"
    """kept or dropped: an instance was kept or dropped by the run's curation (`datagen curate`)."""

    def query(self, **changes) -> dict[str, str]:
        """The filter as query parameters (paging left out unless given), for links that keep the filter."""
        values = {
            "status": None if self.status == "all" else self.status,
            "reason": self.reason,
            "min_similarity": _number(self.min_similarity),
            "max_similarity": _number(self.max_similarity),
            "classification": None if self.classification == "all" else self.classification,
            "q": self.search,
            "sort": None if self.sort == "id" else self.sort,
            "order": None if self.order == "asc" else self.order,
            "min_ifd": _number(self.min_ifd),
            "max_ifd": _number(self.max_ifd),
            "degenerate": None if self.degenerate == "all" else self.degenerate,
            "curation": None if self.curation == "all" else self.curation,
        } | changes
        return {key: str(value) for key, value in values.items() if value is not None}


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def parse_filter(params: Mapping[str, str], sort_keys: Collection[str] = ("id",)) -> ItemFilter:
    """ItemFilter from query parameters; empty values mean "no filter" (what an HTML form sends for a blank field).
    sort_keys: the whitelist of `sort=` values (the page's, datagen.ui.queries.SORT_KEYS)."""
    given = {key: value.strip() for key, value in params.items() if value.strip()}
    unknown = sorted(set(given) - {"status", "reason", "min_similarity", "max_similarity", "classification", "q", "after", "before", "sort", "order",
                                  "min_ifd", "max_ifd", "degenerate", "curation"})  # fmt: skip
    if unknown:
        raise BadFilter(f"unknown filter '{unknown[0]}'")
    status = given.get("status", "all")
    if status not in STATUSES:
        raise BadFilter(f"status must be one of {', '.join(STATUSES)}, not '{status}'")
    classification = given.get("classification", "all")
    if classification not in CLASSIFICATIONS:
        raise BadFilter(f"classification must be one of {', '.join(CLASSIFICATIONS)}, not '{classification}'")
    low, high = _similarity(given, "min_similarity"), _similarity(given, "max_similarity")
    if low is not None and high is not None and low > high:
        raise BadFilter(f"min_similarity {low:g} is above max_similarity {high:g}")
    after, before = _item_id(given, "after"), _item_id(given, "before")
    if after is not None and before is not None:
        raise BadFilter("give after or before, not both")
    sort, order = given.get("sort", "id"), given.get("order", "asc")
    if sort not in sort_keys:
        raise BadFilter(f"sort must be one of {', '.join(sort_keys)}, not '{sort}'")
    if order not in ORDERS:
        raise BadFilter(f"order must be asc or desc, not '{order}'")
    degenerate, curation = given.get("degenerate", "all"), given.get("curation", "all")
    if degenerate not in DEGENERATE:
        raise BadFilter(f"degenerate must be one of {', '.join(DEGENERATE)}, not '{degenerate}'")
    if curation not in CURATION:
        raise BadFilter(f"curation must be one of {', '.join(CURATION)}, not '{curation}'")
    scores = dict(min_ifd=_score(given, "min_ifd"), max_ifd=_score(given, "max_ifd"), degenerate=degenerate, curation=curation)
    return ItemFilter(status, given.get("reason"), low, high, classification, given.get("q"), after, before, sort, order, **scores)


def _score(given: Mapping[str, str], key: str) -> float | None:
    if key not in given:
        return None
    try:
        value = float(given[key])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BadFilter(f"{key} must be a number, not '{given[key]}'")
    return value


def _similarity(given: Mapping[str, str], key: str) -> float | None:
    if key not in given:
        return None
    try:
        value = float(given[key])
    except ValueError:
        raise BadFilter(f"{key} must be a number between 0 and 1, not '{given[key]}'") from None
    if not 0 <= value <= 1:
        raise BadFilter(f"{key} must be between 0 and 1 (ROUGE-L F), not {value:g}")
    return value


def _item_id(given: Mapping[str, str], key: str) -> int | None:
    if key not in given:
        return None
    value = given[key]
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_ID:  # "²".isdigit(), but int("²") fails
        raise BadFilter(f"{key} must be an item id (a whole number up to {MAX_ID}), not '{value}'")
    return int(value)
