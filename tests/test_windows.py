from datetime import datetime, time

from pacs2bids.config import TimeWindow
from pacs2bids.windows import is_open, next_opening

NIGHTS = TimeWindow(days=["mon", "tue", "wed", "thu", "fri"], start=time(20, 0), end=time(6, 0))
WEEKEND = TimeWindow(days=["sat", "sun"], start=time(0, 0), end=time(23, 59))


def test_no_window_means_always_open():
    assert is_open([], datetime(2026, 11, 23, 12, 0))


def test_night_window_crosses_midnight():
    mon_2130 = datetime(2026, 11, 23, 21, 30)  # a Monday
    tue_0500 = datetime(2026, 11, 24, 5, 0)
    tue_1200 = datetime(2026, 11, 24, 12, 0)
    assert is_open([NIGHTS], mon_2130) and is_open([NIGHTS], tue_0500)
    assert not is_open([NIGHTS], tue_1200)
    assert next_opening([NIGHTS], tue_1200) == datetime(2026, 11, 24, 20, 0)


def test_friday_night_runs_into_saturday_and_weekend_follows():
    sat_0300 = datetime(2026, 11, 28, 3, 0)
    assert is_open([NIGHTS], sat_0300)  # Friday's night window
    mon_0700 = datetime(2026, 11, 30, 7, 0)
    assert not is_open([NIGHTS, WEEKEND], mon_0700)
    assert next_opening([NIGHTS, WEEKEND], mon_0700) == datetime(2026, 11, 30, 20, 0)
    sun_noon = datetime(2026, 11, 29, 12, 0)
    assert next_opening([NIGHTS, WEEKEND], sun_noon) == sun_noon
