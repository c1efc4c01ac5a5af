"""The run's progress tracker and its terminal renderers, with a fake clock (no timing)."""

from __future__ import annotations

import io
import threading

from pacs2bids import progress
from pacs2bids.model import SeriesRef, StudyRef
from pacs2bids.progressview import LineProgress, renderer, show_progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def studies() -> list[StudyRef]:
    """Two studies: 3 series of 10, 20 and an unknown count; 1 series of 30."""
    def s(uid, n):
        return SeriesRef("1.2.3", uid, series_number=1, announced_instances=n)
    return [StudyRef(2, "01", None, "1.2.3", series=[s("a", 10), s("b", 20), s("c", None)]),
            StudyRef(3, "02", None, "1.2.4", series=[s("d", 30)])]


def test_totals_fractions_rate_and_eta():
    clock = Clock()
    t = progress.RunProgress("r1", clock)
    t.begin(studies())
    snap = t.snapshot()
    assert (snap.studies, snap.series, snap.instances) == (2, 4, 60)
    assert snap.fraction == 0.0 and snap.eta is None and snap.mb_per_second is None
    assert snap.text() == "studies 0/2 · series 0/4 · instances 0/60 · - MB/s · time left: -"

    clock.now += 10
    t.received("a", 4, 10)
    t.received("a", 10, 10)  # a running count: the last one counts, once
    t.received("b", 20, 20)
    t.received("b", 5, 20)  # a later attempt's own count never lowers what was received
    t.add_bytes(15_000_000)
    snap = t.snapshot()
    assert snap.instances_received == 30 and snap.series_done == 2
    assert snap.fraction == 0.25  # half the instances received, no study done
    assert snap.mb_per_second == 1.5 and snap.eta is None

    clock.now += 30  # 40 s since the totals, one study of two done: 40 s left
    t.study_done(["a", "b", "c"])
    snap = t.snapshot()
    assert snap.studies_done == 1 and snap.series_done == 3
    assert snap.fraction == 0.5 and snap.eta == 40.0
    assert snap.text() == "studies 1/2 · series 3/4 · instances 30/60 · 0.4 MB/s · 40s left"

    t.received("d", 30, 30)
    t.study_done(["d"])
    t.finish()
    snap = t.snapshot()
    assert snap.fraction == 1.0 and snap.eta == 0.0 and snap.text().endswith("· done")


def test_eta_and_durations():
    clock = Clock()
    t = progress.RunProgress("r", clock)
    t.begin(studies() * 5)  # 10 studies
    clock.now += 90
    for _ in range(3):
        t.study_done()
    assert t.snapshot().eta == 210.0  # 30 s per study, 7 to go
    assert progress.duration(210) == "3m30s" and progress.duration(3725) == "1h02m" and progress.duration(9) == "9s"


def test_observers_get_snapshots_and_their_failures_stay_out_of_the_run():
    t = progress.RunProgress("r", Clock())
    seen = []

    def broken(_snap):
        raise RuntimeError("the UI is down")

    t.subscribe(broken)
    t.subscribe(seen.append)
    t.begin(studies())
    t.received("a", 3, 10)
    assert [s.instances_received for s in seen] == [0, 3]


def test_concurrent_events_are_all_counted():
    t = progress.RunProgress("r", Clock())
    t.begin(studies() * 50)

    def work(i):
        for n in range(1, 101):
            t.received(f"s{i}", n, 100)
            t.add_bytes(10)
        t.study_done()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    snap = t.snapshot()
    assert snap.instances_received == 800 and snap.bytes_received == 8000 and snap.studies_done == 8


def test_registry_and_watchers():
    opened = []
    remove = progress.on_open(opened.append)
    try:
        t = progress.open_run("run-x")
        assert progress.tracker("run-x") is t and opened == [t]
    finally:
        remove()
        progress.close_run("run-x")
    assert progress.tracker("run-x") is None
    progress.close_run("run-y")
    progress.open_run("run-y")
    assert opened == [t]  # removed watchers see no more runs
    progress.close_run("run-y")


def test_lines_at_most_every_n_seconds_first_and_last_always():
    clock, out = Clock(), io.StringIO()
    view = LineProgress(out, every=30, clock=clock)
    t = progress.RunProgress("r", clock)
    t.subscribe(view)
    t.begin(studies())
    t.received("a", 10, 10)  # within 30 s of the first line: not printed
    clock.now += 31
    t.received("b", 20, 20)
    clock.now += 1
    t.finish()
    lines = out.getvalue().splitlines()
    assert lines == ["pacs2bids: progress: studies 0/2 · series 0/4 · instances 0/60 · - MB/s · time left: -",
                     "pacs2bids: progress: studies 0/2 · series 2/4 · instances 30/60 · 0.0 MB/s · time left: -",
                     "pacs2bids: progress: studies 0/2 · series 2/4 · instances 30/60 · 0.0 MB/s · done"]


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_other_streams_lines():
    out = Tty()
    with show_progress(out):
        t = progress.open_run("run-tty")
        t.begin(studies())
        t.study_done()
        t.finish()
    progress.close_run("run-tty")
    assert "studies 1/2" in out.getvalue() and "pacs2bids: progress:" not in out.getvalue()
    assert isinstance(renderer(io.StringIO()), LineProgress)


def test_the_progress_artifact_is_written_per_study_and_otherwise_at_most_every_few_seconds():
    """Each write of the Prefect progress artifact is an API request (issue 12: fixed costs): series
    completing and instances arriving are written at most every UPDATE_SECONDS; the first snapshot,
    each completed study and the end always. The Prefect write itself is left out (``_write``)."""
    from pacs2bids.tasks.progress import UPDATE_SECONDS, ProgressArtifact

    class Recorded(ProgressArtifact):
        def _write(self, pct, description):
            writes.append((pct, description))

    writes: list = []
    clock = Clock()
    t = progress.RunProgress("r", clock)
    t.subscribe(Recorded("p", "r", clock=clock))
    t.begin(studies())
    assert len(writes) == 1  # the first snapshot
    t.received("a", 10, 10)
    t.received("b", 20, 20)  # two series done within the same seconds: not written yet
    t.add_bytes(1_000_000)
    assert len(writes) == 1
    clock.now += UPDATE_SECONDS
    t.received("c", 1, None)  # some seconds later, anything new: written
    assert len(writes) == 2
    t.study_done(["a", "b", "c"])  # a study completed: written at once
    assert len(writes) == 3 and "studies 1/2" in writes[-1][1]
    t.received("d", 30, 30)  # its series done a moment later: not written
    assert len(writes) == 3
    t.study_done(["d"])
    t.finish()
    assert len(writes) == 5 and writes[-1][0] == 100.0 and writes[-1][1].endswith("· done")
