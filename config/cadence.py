"""How often a scheduled job runs: a period on a fixed UTC grid.

A cadence is either a number of seconds ("300": every 5 minutes, at :00, :05,
...) or a daily UTC time ("02:30"). Slots are the grid's instants; every
process computes the same slot for the same instant, which is what lets two
beat processes agree on "the 10:05 run" without talking to each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

DAY = 86_400
_DAILY = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True, slots=True)
class Cadence:
    period: int  # seconds
    offset: int = 0  # seconds after midnight UTC; only daily cadences have one

    def slot(self, at: datetime) -> datetime:
        """The grid instant at or before `at` (an aware datetime): the slot `at` falls in."""
        seconds = int(at.timestamp()) - self.offset
        return datetime.fromtimestamp(seconds - seconds % self.period + self.offset, UTC)

    def next_slot(self, at: datetime) -> datetime:
        return self.slot(at) + timedelta(seconds=self.period)

    def describe(self) -> str:
        if self.period == DAY:
            return f"daily at {self.offset // 3600:02d}:{self.offset % 3600 // 60:02d}"
        for unit, size in (("h", 3600), ("min", 60)):
            if self.period % size == 0:
                return f"every {self.period // size} {unit}"
        return f"every {self.period} s"


def parse_cadence(value: object) -> object:
    """`"300"` (seconds) or `"02:30"` (daily, UTC); anything else is left for pydantic to refuse."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.isdigit():
        if not 0 < int(text) <= DAY:
            raise ValueError("must be between 1 and 86400 seconds")
        return Cadence(int(text))
    daily = _DAILY.match(text)
    if daily:
        return Cadence(DAY, int(daily[1]) * 3600 + int(daily[2]) * 60)
    raise ValueError("must be a number of seconds (e.g. 300) or a daily UTC time HH:MM (e.g. 02:30)")
