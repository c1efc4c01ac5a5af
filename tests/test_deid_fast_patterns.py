"""The byte patterns of the scrub, rewritten for speed (issue 12), find exactly what the plain
forms find: the file's dates (not inside longer digit runs, a compact date followed by a time of
day) and UID-like tokens (not preceded by a digit or a dot)."""

from __future__ import annotations

import random
import re

from pacs2bids.deid import csa
from pacs2bids.deid.patterns import date_tokens

DATES = ["20210715", "19990909", "20200229"]


def _plain_dates(dates: list[str]) -> re.Pattern[bytes]:
    """The look-behind-first form: one alternation of every form of every date."""
    alts: set[str] = set()
    for d in dates:
        y, m, dd = d[:4], d[4:6], d[6:]
        alts.add(y + m + dd)
        for sep in "-./":
            alts.update({re.escape(f"{y}{sep}{m}{sep}{dd}"), re.escape(f"{dd}{sep}{m}{sep}{y}")})
    compact = "|".join(sorted(a for a in alts if a.isdigit()))
    return re.compile(rb"(?<![0-9])(?:" + "|".join(sorted(alts)).encode() + rb")(?![0-9])"
                      + rb"|(?<![0-9])(?:" + compact.encode() + rb")(?=(?:[01][0-9]|2[0-3])[0-5][0-9])")


_PLAIN_UID = re.compile(rb"(?<![0-9.])[0-9]{1,10}(?:\.[0-9]{1,40}){4,}(?![0-9])")


def test_date_pattern_boundaries():
    p = date_tokens(DATES)
    hits = lambda s: [m.group(0) for m in p.finditer(s)]  # noqa: E731
    assert hits(b"20210715") == [b"20210715"]
    assert hits(b"x15.07.2021y 2021-07-15") == [b"15.07.2021", b"2021-07-15"]
    assert hits(b"120210715") == [] and hits(b"202107151") == []  # inside a longer number
    assert hits(b"202107151230") == [b"20210715"]  # a time of day follows
    assert hits(b"202107152530") == []  # not a time of day
    assert hits(b"29/02/2020") == [b"29/02/2020"]


def test_uid_token_boundaries():
    hits = lambda s: [m.group(0) for m in csa._UID_TOKEN.finditer(s)]  # noqa: E731
    assert hits(b"1.2.840.1.5") == [b"1.2.840.1.5"]
    assert hits(b'"1.3.12.2.1107.5.2"x') == [b"1.3.12.2.1107.5.2"]
    assert hits(b".1.2.3.4.5") == [] and hits(b"1.2.3.4") == []
    assert hits(b"12345678901.2.3.4.5") == []  # more than 10 digits first: not a UID, as before


def test_fast_patterns_find_what_the_plain_forms_find():
    rnd = random.Random(12)
    pieces = [b"20210715", b"2021-07-15", b"15.07.2021", b"15/07/2021", b"1999.09.09", b"2021071512",
              b"2021071525", b"202107151259", b"1.2.3.4.5", b"12.34.5.6.7.8", b"29-02-2020"]
    fast, plain = date_tokens(DATES), _plain_dates(DATES)
    for _ in range(20000):
        s = b"".join(rnd.choice(pieces) if rnd.random() < 0.3 else bytes([rnd.choice(b"0123456789.-/ \nX")])
                     for _ in range(rnd.randint(0, 12)))
        assert [m.span() for m in fast.finditer(s)] == [m.span() for m in plain.finditer(s)], s
        assert [m.span() for m in csa._UID_TOKEN.finditer(s)] == [m.span() for m in _PLAIN_UID.finditer(s)], s


def test_batch_runs_without_pydicom_value_checks(sample_dir, tmp_path):
    """pydicom's value checks (WARN mode: warnings only) are off while a batch runs, and the
    process's setting is as it was afterwards; the file is pseudonymised all the same."""
    import warnings
    from pathlib import Path

    import pydicom
    from pydicom import config

    from pacs2bids.config import PseudonymizationSettings
    from pacs2bids.deid.batch import Known, SeriesJob, deid_batch

    src = next(p for p in sorted(Path(sample_dir).rglob("*")) if p.is_file() and p.suffix in ("", ".dcm")
               and _is_dicom(p))
    ds = pydicom.dcmread(src)
    ds.FrameOfReferenceUID = "1.2.3.4.5.bad_uid"  # not a valid UI value: pydicom would warn on decoding it
    planted = tmp_path / "in.dcm"
    ds.save_as(planted)
    job = SeriesJob("t", "proj", b"test-secret-0123456789abcdef", PseudonymizationSettings(workers=1), "01", None,
                    tmp_path, Known(frozenset(), frozenset()))
    before = config.settings._reading_validation_mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = deid_batch(job, [(0, str(planted))])
    assert [f[1] for f in result.files] == ["written"]
    assert not [w for w in caught if "Invalid value" in str(w.message)]
    assert config.settings._reading_validation_mode == before
    out = pydicom.dcmread(tmp_path / result.files[0][3])
    assert out.FrameOfReferenceUID.startswith("2.25.")


def _is_dicom(path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"
