"""Fewer round trips for the same query (issue 12), against a real Orthanc: one study search per
inclusion row when the PACS's answer is known whole (C-FIND), the series of every matched study
in one search (List of UID matching), each study checked against its NumberOfStudyRelatedSeries.
The result is compared with the one-search-per-study path, and the searches are counted."""

from __future__ import annotations

import logging
from datetime import date

import pytest

from pacs2bids import query
from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.pacs import close_pools, services
from pacs2bids.pacs.dicomweb import WebPacs

from test_query import SAMPLE, bad_value_studies, planted_studies
from test_retrieve import dimse_yaml, make_spec, web_yaml

ROWS = [("patient_id", "DEV", "A"), ("accession_number", "ACC42", "B"), ("patient_id", "PLANTED1", "C"),
        ("patient_id", "NOBODY", "D"), ("patient_id", "BADVAL", "E"), ("accession_number", "ACC3", "F")]
DATES = "  study_date: {from: 2021-02-01, to: 2021-04-30}\n"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    from pacs2bids.orthanc import Orthanc

    o = Orthanc(workdir=tmp_path_factory.mktemp("orthanc"))
    o.start()
    files = [p for d in ("dcm_qa_nih", "dcm_qa_philips", "dcm_qa_ge") for p in iter_dicom_files(SAMPLE / d)]
    assert o.upload(files + planted_studies() + bad_value_studies()) == len(files) + 5 + 8
    yield o
    close_pools()
    o.stop()


class _Counted:
    """Counts what reaches the PACS: C-FIND requests (``services.find``) or QIDO-RS searches
    (``WebPacs.search``), and the calls per transport method."""

    def __init__(self, monkeypatch):
        self.requests = 0
        self.methods: dict[str, int] = {}
        real_find, real_search = services.find, WebPacs.search

        def find(*a, **kw):
            self.requests += 1
            return real_find(*a, **kw)

        def search(web, *a, **kw):
            self.requests += 1
            return real_search(web, *a, **kw)

        monkeypatch.setattr(services, "find", find)
        monkeypatch.setattr(WebPacs, "search", search)
        real_open = query.open_transport

        def open_counted(spec):
            transport = real_open(spec)
            for name in ("find_every_study", "find_studies", "find_series", "find_series_of", "find_window"):
                method = getattr(transport, name)

                def counted(*a, _name=name, _method=method, **kw):
                    self.methods[_name] = self.methods.get(_name, 0) + 1
                    return _method(*a, **kw)

                setattr(transport, name, counted)
            return transport

        monkeypatch.setattr(query, "open_transport", open_counted)


def _one_search_per_study(monkeypatch):
    """The path before batching: the answer without a date never taken as whole, no series batch."""
    real_open = query.open_transport

    def open_plain(spec):
        transport = real_open(spec)
        every = transport.find_every_study
        transport.find_every_study = lambda key, value: (every(key, value)[0], False)
        transport.find_series_of = lambda uids: None
        return transport

    monkeypatch.setattr(query, "open_transport", open_plain)


def _summary(q: query.QueryResult):
    """What a query found, in an order of its own: Orthanc answers one search in varying orders."""
    return (sorted([(st.inclusion_row, st.subject, st.study_instance_uid, st.study_date, st.study_description,
              st.excluded_series, [(s.series_instance_uid, s.modality, s.series_number, s.series_description,
                                    s.announced_instances) for s in st.series]) for st in q.studies]),
            [i.row for i in q.unmatched], q.unapplied)


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
@pytest.mark.parametrize("dates", ["", DATES])
def test_batched_query_equals_one_search_per_study_with_fewer_searches(tmp_path, pacs, monkeypatch, kind, dates):
    spec = make_spec(tmp_path, dimse_yaml(pacs) if kind == "dimse" else web_yaml(pacs), ROWS, extra=dates)
    with monkeypatch.context() as m:
        _one_search_per_study(m)
        before = _Counted(m)
        reference = query.find_studies(spec)
    close_pools()
    after = _Counted(monkeypatch)
    got = query.find_studies(spec)
    close_pools()
    assert _summary(got) == _summary(reference)
    studies = len({st.study_instance_uid for st in got.studies})
    assert studies >= 4 and len(got.unmatched) >= 1
    assert after.methods.get("find_series_of") == 1 and "find_series" not in after.methods, after.methods
    if kind == "dimse":  # one C-FIND per row, one for every series: the answers were whole
        assert after.requests == len(ROWS) + 1, after.methods
        assert "find_studies" not in after.methods
    else:  # QIDO-RS: the search by date only for the rows whose answer without a date holds several studies
        assert after.methods.get("find_studies") == 2, after.methods  # PLANTED1 and BADVAL
    assert after.requests <= before.requests - studies + 1, (after.requests, before.requests)


class _FirstUidOnly:
    """A PACS that matches only the first UID of a list (some do): the fault the real Orthanc,
    which honours lists, cannot show. It wraps the real transport's batch answer."""

    def __init__(self, transport):
        self.real = transport.find_series_of

    def __call__(self, uids):
        answer = self.real(uids)
        return None if answer is None else [se for se in answer if se.StudyInstanceUID == uids[0]]


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_a_batch_answered_in_part_falls_back_to_one_search_per_study(tmp_path, pacs, monkeypatch, kind):
    spec = make_spec(tmp_path, dimse_yaml(pacs) if kind == "dimse" else web_yaml(pacs), ROWS)
    with monkeypatch.context() as m:
        _one_search_per_study(m)
        reference = query.find_studies(spec)
    close_pools()
    real_open = query.open_transport

    def open_partial(spec):
        transport = real_open(spec)
        transport.find_series_of = _FirstUidOnly(transport)
        return transport

    monkeypatch.setattr(query, "open_transport", open_partial)
    counted = _Counted(monkeypatch)
    got = query.find_studies(spec)
    close_pools()
    assert _summary(got) == _summary(reference)
    studies = len({st.study_instance_uid for st in got.studies})
    assert counted.methods["find_series"] == studies - 1  # the first study came whole from the batch



@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_the_query_holds_one_slot_of_the_pacs_gate(tmp_path, pacs, monkeypatch, kind):
    """Every search of the query goes through one slot of the PACS's gate (the flow backs it with a
    Prefect global concurrency limit, whose every slot costs a round trip to Prefect's API), and
    gives it back at the end: over DICOMweb one slot per search was taken before."""
    from pacs2bids.pacs import gate

    spec = make_spec(tmp_path, dimse_yaml(pacs) if kind == "dimse" else web_yaml(pacs), ROWS)
    taken, given_back = [], []

    def counting_gate():
        taken.append(1)
        return lambda: given_back.append(1)

    gate.set_gate(spec.pacs, counting_gate)
    try:
        counted = _Counted(monkeypatch)
        q = query.find_studies(spec)
        close_pools()
    finally:
        gate.set_gate(spec.pacs, None)
    assert q.studies and counted.requests > len(ROWS)
    assert len(taken) == 1 and len(given_back) == 1, (len(taken), counted.requests)


def _per_row(monkeypatch):
    """The path before the date-window search (issue 14): the window answer never whole, so each
    bounded row is asked by a search of its own (the fallback)."""
    real_open = query.open_transport

    def open_per_row(spec):
        transport = real_open(spec)
        transport.find_window = lambda lo, hi: ([], False)
        return transport

    monkeypatch.setattr(query, "open_transport", open_per_row)


def _bounds(spec, days: dict[str, date]) -> dict[int, date]:
    return {inc.row: days[inc.subject] for inc in spec.inclusions if inc.subject in days}


#: PLANTED1 (C) has a study on 2021-05-15, in its window; ACC3 (F) is dated 2021-04-15, before its
#: window; NOBODY (D) has none; the others are asked whole (never replicated).
WINDOWS = {"C": date(2021, 5, 1), "F": date(2021, 6, 1), "D": date(2021, 1, 1)}


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_one_window_search_finds_what_the_per_row_searches_found(tmp_path, pacs, monkeypatch, kind):
    spec = make_spec(tmp_path, dimse_yaml(pacs) if kind == "dimse" else web_yaml(pacs), ROWS)
    since = _bounds(spec, WINDOWS)
    with monkeypatch.context() as m:
        per_row = _Counted(m)
        _per_row(m)
        reference = query.find_studies(spec, since)
    close_pools()
    window = _Counted(monkeypatch)
    got = query.find_studies(spec, since)
    close_pools()
    assert _summary(got) == _summary(reference)
    assert {st.subject for st in got.studies} == {"A", "B", "C", "E"}  # F's study is before its window
    assert [i.subject for i in got.unmatched] == []  # D is bounded: done, not unmatched
    assert window.methods["find_window"] == 1, window.methods
    rows_asked = sum(window.methods.get(m, 0) for m in ("find_every_study", "find_studies"))
    rows_asked_before = sum(per_row.methods.get(m, 0) for m in ("find_every_study", "find_studies"))
    assert rows_asked == rows_asked_before - len(since), (window.methods, per_row.methods)
    # what the PACS served: one search instead of one per bounded row (QIDO-RS: three, to check it whole)
    window_cost = 1 if kind == "dimse" else 3
    assert window.requests == per_row.requests - len(since) + window_cost, (window.requests, per_row.requests)


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_a_window_answer_cut_short_falls_back_to_one_search_per_row(tmp_path, orthanc_factory, monkeypatch,
                                                                   caplog, kind):
    """Orthanc cuts every answer at LimitFindResults (C-FIND: Cancel; QIDO-RS: without a word)."""
    o = orthanc_factory(extra={"LimitFindResults": 2})
    assert o.upload(planted_studies(5)) == 5
    rows = [("patient_id", "PLANTED1", "C"), ("patient_id", "NOBODY", "D"), ("accession_number", "ACC3", "F")]
    spec = make_spec(tmp_path, dimse_yaml(o) if kind == "dimse" else web_yaml(o), rows)
    since = _bounds(spec, WINDOWS)  # the window from January holds the five studies: cut at two
    counted = _Counted(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pacs2bids.query"):
        got = query.find_studies(spec, since)
    close_pools()
    assert "cut the study search by date window short" in caplog.text
    assert "PLANTED1" not in caplog.text and "ACC3" not in caplog.text
    assert counted.methods["find_window"] == 1
    assert counted.methods["find_studies"] >= len(since)  # each bounded row asked on its own
    assert sorted(st.study_date for st in got.studies) == [f"2021{i:02d}15" for i in range(1, 6)]
    assert {st.subject for st in got.studies} == {"C"} and got.unmatched == []
