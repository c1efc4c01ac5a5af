"""Retrieval time windows: when a PACS allows us to retrieve (for example nights and week-ends).

Outside every window a run waits rather than retrieves (REQUIREMENTS E5). A window may cross
midnight (``20:00``-``06:00``); its ``days`` are the days on which it opens.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Iterable, Protocol

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Window(Protocol):
    days: list[str]
    start: time
    end: time


def _open_at(w: Window, moment: datetime) -> bool:
    day = DAYS[moment.weekday()]
    prev = DAYS[(moment.weekday() - 1) % 7]
    t = moment.time()
    if w.start <= w.end:
        return day in w.days and w.start <= t < w.end
    # crosses midnight: opened today after start, or opened yesterday and not yet closed
    return (day in w.days and t >= w.start) or (prev in w.days and t < w.end)


def is_open(windows: Iterable[Window], moment: datetime) -> bool:
    """True if ``moment`` lies in a window (no windows: always open)."""
    windows = list(windows)
    return not windows or any(_open_at(w, moment) for w in windows)


def next_opening(windows: Iterable[Window], moment: datetime) -> datetime:
    """``moment`` if open, else the next minute at which a window opens (within a week)."""
    windows = list(windows)
    if is_open(windows, moment):
        return moment
    candidates = []
    for offset in range(0, 8):
        day = (moment + timedelta(days=offset)).date()
        for w in windows:
            if DAYS[day.weekday()] in w.days:
                start = datetime.combine(day, w.start, tzinfo=moment.tzinfo)
                if start > moment:
                    candidates.append(start)
    if not candidates:
        raise ValueError("no retrieval window ever opens: check pacs.windows days")
    return min(candidates)


def wait_until_open(windows: Iterable[Window], *, now=None, sleep=None, log=None, max_step: float = 300.0) -> float:
    """Block until a window is open; returns the seconds waited. ``now``/``sleep`` are injectable."""
    import time as _time

    now = now or (lambda: datetime.now().astimezone())
    sleep = sleep or _time.sleep
    windows = list(windows)
    waited = 0.0
    while not is_open(windows, now()):
        opening = next_opening(windows, now())
        delay = max(1.0, min(max_step, (opening - now()).total_seconds()))
        if log:
            log(f"outside the PACS's retrieval windows; waiting until {opening:%a %H:%M}")
        sleep(delay)
        waited += delay
    return waited
