"""dcm2niix once per session: the executable, its command, and its outputs mapped back to their
DICOM series (outputs are named after their first file, ``-f %b``)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial

from pacs2bids.convert.series import ConvertedSeries
from pacs2bids.sopclasses import ENHANCED_FORM, is_image_sop_class
from pacs2bids.dicomfiles import iter_dicom_files
from pacs2bids.errors import ConversionError

log = logging.getLogger(__name__)

def child_env() -> dict[str, str]:
    """The environment a converter needs (:func:`pacs2bids.childenv.child_env`, the allow-list
    every child gets: never the project secret), with this interpreter's folder first on PATH
    (pip's dcm2niix wheel) and nipype's network check off."""
    from pacs2bids.childenv import child_env as allowed

    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", os.defpath)
    return allowed(PATH=path, NIPYPE_NO_ET="1", NO_ET="1")


def dcm2niix_exe() -> str:
    """dcm2niix beside this interpreter (pip's wheel), else on PATH."""
    exe = Path(sys.executable).parent / "dcm2niix"
    found = str(exe) if exe.exists() else shutil.which("dcm2niix")
    if not found:
        raise ConversionError("dcm2niix is not installed: pip install dcm2niix (or apt install dcm2niix)")
    return found


_CONVERT_LINE = re.compile(r"^Convert (\d+) DICOM as (.+?) \(")
_DATE_TAGS = ("AcquisitionDate", "SeriesDate", "ContentDate", "StudyDate")

@dataclass
class SessionSeries:
    """One DICOM series of a session, as read from its (pseudonymised) headers."""

    uid: str
    number: int | None
    description: str
    files: list[Path] = field(default_factory=list)
    date: str = ""  # YYYYMMDD of the (shifted) acquisition, "" when unreadable
    left_out: str = ""  # what of its files dcm2niix is not given, and why (:func:`_one_form`)


def _read_ids(path: Path):
    """The few header elements a session scan needs (they all precede (0020,0011), so the rest of
    the header, private CSA blocks included, is not parsed)."""
    with open(path, "rb") as fp:
        return read_partial(fp, stop_when=lambda tag, vr, length: tag > 0x00200011)


def _same_series(path: Path, uid: bytes, sop: bytes) -> bool:
    """True when ``path``'s header holds this series UID and SOP class (a byte search of its first
    64 KiB; a UID followed by another digit or dot is a different UID)."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(65536)
    except OSError:
        return False
    for needle in (uid, sop):
        at = head.find(needle)
        if at < 0 or head[at + len(needle): at + len(needle) + 1] in (b".", *[bytes([c]) for c in b"0123456789"]):
            return False
    return True


def _frames(files: list[Path]) -> int | None:
    """The frames of these multi-frame files together (NumberOfFrames); None when one is unreadable."""
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fp:
                ds = read_partial(fp, stop_when=lambda tag, vr, length: tag > 0x00280008)
            total += int(ds.get("NumberOfFrames", 1) or 1)
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError):
            return None
    return total


def _one_form(s: SessionSeries, by_class: dict[str, list[Path]]) -> None:
    """A series sent both as classic images and in enhanced form (the same frames, under one
    Series Instance UID: a Philips set to export both) is converted from its classic images only:
    given both, dcm2niix makes two of every image, and the series fails as split. Only when the
    enhanced files hold exactly as many frames as there are classic images: else both stay."""
    for classic, (enhanced, kind) in ENHANCED_FORM.items():
        cl, en = by_class.get(classic, []), by_class.get(enhanced, [])
        if cl and en and _frames(en) == len(cl):
            drop = set(en)
            s.files = [f for f in s.files if f not in drop]
            s.left_out = (f"converted from its {len(cl)} classic {kind} images; the {len(en)} enhanced {kind} "
                          "object(s) holding the same frames were not converted (both stay in sourcedata)")


def scan_session(dicom_dir: Path) -> tuple[list[SessionSeries], list[ConvertedSeries]]:
    """The image series under ``dicom_dir`` (in series-number order) and the non-image ones,
    already reported as ``skipped``. A file whose folder's previous file was of the same series
    (checked by a byte search) is not parsed again: sourcedata holds one folder per series. A
    series sent in both classic and enhanced form keeps its classic files only (:func:`_one_form`)."""
    series: dict[str, SessionSeries] = {}
    filtered: dict[str, ConvertedSeries] = {}
    by_class: dict[str, dict[str, list[Path]]] = {}  # series UID -> SOP class -> its image files
    last: tuple[Path, bytes, bytes, str] | None = None  # folder, uid, sop class, uid of the previous file
    for path in iter_dicom_files(dicom_dir):
        if last and last[0] == path.parent and _same_series(path, last[1], last[2]):
            if last[3] in series and (same := by_class[last[3]].get(last[2].decode())) is not None:
                series[last[3]].files.append(path)  # of an image class, as the previous file
                same.append(path)
            continue
        try:
            ds = _read_ids(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            log.warning("skipping unreadable file %s: %s", path.name, type(exc).__name__)
            last = None
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        sop = str(ds.get("SOPClassUID", ""))
        last = (path.parent, uid.encode(), sop.encode(), uid) if uid and sop else None
        sn = ds.get("SeriesNumber")
        try:
            number = int(sn) if sn not in (None, "") else None
        except (TypeError, ValueError):
            number = None
        if not is_image_sop_class(sop):
            if uid not in filtered:
                what = getattr(ds.SOPClassUID, "name", sop) if "SOPClassUID" in ds else "no SOP class"
                filtered[uid] = ConvertedSeries(uid, number, str(ds.get("SeriesDescription", "")), "skipped", [],
                                                f"non-image object ({what})")
            continue
        s = series.get(uid)
        if s is None:
            date = next((str(ds.get(t) or "") for t in _DATE_TAGS if str(ds.get(t) or "").strip()), "")
            s = series[uid] = SessionSeries(uid, number, str(ds.get("SeriesDescription", "")), [], date)
        s.files.append(path)
        by_class.setdefault(uid, {}).setdefault(sop, []).append(path)
    for uid, classes in by_class.items():
        if len(classes) > 1:
            _one_form(series[uid], classes)
    ordered = sorted(series.values(), key=lambda s: (s.number is None, s.number or 0, s.uid))
    return ordered, [f for u, f in filtered.items() if u not in series]


def stage_series(series: list[SessionSeries], stage: Path) -> dict[str, int]:
    """Link each series' files under ``stage/sNNNN/`` named ``sNNNNfMMMMM`` (for sessions whose file
    names are not unique); returns {link name: series index}. Hard links (symbolic ones across
    file systems): a symbolic link costs 50 times more here."""
    hard = True
    names: dict[str, int] = {}
    for k, s in enumerate(series):
        folder = stage / f"s{k:04d}"
        folder.mkdir(parents=True)
        for i, f in enumerate(s.files):
            target = folder / f"s{k:04d}f{i:05d}"
            names[target.name] = k
            if hard:
                try:
                    os.link(f, target)
                    continue
                except OSError:
                    hard = False
            os.symlink(Path(f).resolve(), target)
    return names


@dataclass
class Dcm2niixRun:
    """One dcm2niix run on a session, mapped back to its DICOM series."""

    series: list[SessionSeries]  # image series, in series-number order
    skipped: list[ConvertedSeries]  # non-image series
    outputs: list  # pacs2bids.convert.facts.Dcm2niixOutput, one per sidecar written
    merged: dict[int, int]  # series index stacked by dcm2niix into another series' image -> that index
    suffix: dict[str, str]  # output stem name -> what dcm2niix appended to its first file's name
    returncode: int
    log: str


_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _dcm2niix_cmd(src: Path, out: Path, sidecar_only: bool) -> list[str]:
    # -f %b: each output is named after its first DICOM file, so it maps back to that file's series
    return [dcm2niix_exe(), "-b", "o" if sidecar_only else "y", "-z", "y", "-f", "%b", "-o", str(out), str(src)]


def dcm2niix_session(roots: list[Path], private: Path, *, sidecar_only: bool = False) -> Dcm2niixRun:
    """Run dcm2niix once on the DICOM under ``roots`` (one session) into ``private/out``.

    When the session is one folder whose file names are all distinct (sourcedata: one file per
    pseudonymised SOP Instance UID), dcm2niix reads it in place while the headers are scanned;
    otherwise the files are linked into ``private/in`` under names of their own first. Its
    output (stdout and stderr) is in :attr:`Dcm2niixRun.log`."""
    private.mkdir(parents=True, exist_ok=True)
    out = private / "out"
    out.mkdir()
    files = [Path(dp) / n for root in roots for dp, _, names in os.walk(root, followlinks=True) for n in names]
    direct = len(roots) == 1 and len({f.name for f in files}) == len(files) and all(
        _SAFE_NAME.match(f.name) for f in files)
    log_path = private / "dcm2niix.log"
    with open(log_path, "w") as fh:
        if direct:
            proc = subprocess.Popen(_dcm2niix_cmd(roots[0], out, sidecar_only), stdout=fh, stderr=subprocess.STDOUT,
                                    env=child_env(), cwd=private)
            try:
                series, skipped = scan_session(roots[0])  # meanwhile
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            names = _name_keys(series)
            if names is None or any(s.left_out for s in series):
                # two files' names differ only by their extension, or dcm2niix is not to read them all:
                # name the links instead
                proc.kill()
                proc.wait()
                shutil.rmtree(out)
                out.mkdir()
                (private / "in").mkdir()
                names = stage_series(series, private / "in")
                proc = subprocess.Popen(_dcm2niix_cmd(private / "in", out, sidecar_only), stdout=fh,
                                        stderr=subprocess.STDOUT, env=child_env(), cwd=private)
        else:
            series, skipped = [], []
            for root in roots:
                a, b = scan_session(root)
                series += a
                skipped += b
            series.sort(key=lambda s: (s.number is None, s.number or 0, s.uid))
            (private / "in").mkdir()
            names = stage_series(series, private / "in")
            proc = subprocess.Popen(_dcm2niix_cmd(private / "in", out, sidecar_only), stdout=fh,
                                    stderr=subprocess.STDOUT, env=child_env(), cwd=private)
        returncode = proc.wait()
    log_text = f"$ dcm2niix (exit {returncode})\n" + log_path.read_text(errors="replace")
    outputs, merged, suffix = collect_outputs(series, out, log_text, names)
    return Dcm2niixRun(series, skipped, outputs, merged, suffix, returncode, log_text)


def _name_keys(series: list[SessionSeries]) -> dict[str, int] | None:
    """{file name as dcm2niix's %b may give it: series index}. %b drops the extension's letters
    ("x.dcm" -> "x."); the name without extension and the whole name are kept too. None when
    two files of different series would give the same key."""
    keys: dict[str, int] = {}
    for k, s in enumerate(series):
        for f in s.files:
            stem, dot, ext = f.name.rpartition(".")
            for key in {f.name, stem + dot, stem} - {""} if dot else {f.name}:
                if keys.setdefault(key, k) != k:
                    return None
    return keys


def _owner(stem: str, names: dict[str, int]) -> tuple[int, str] | None:
    """(series index, what dcm2niix appended) for an output named after one of ``names``."""
    for i in range(len(stem), 0, -1):
        k = names.get(stem[:i])
        if k is not None:
            return k, stem[i:]
    return None


def collect_outputs(series: list[SessionSeries], out: Path, log_text: str, names: dict[str, int]
                    ) -> tuple[list, dict[int, int], dict[str, str]]:
    """One :class:`~pacs2bids.convert.facts.Dcm2niixOutput` per sidecar dcm2niix wrote in ``out``,
    {index of a series dcm2niix stacked into another one's image: index of that series}, and
    {output stem name: what dcm2niix appended to its first file's name}.

    dcm2niix stacks some series into one image (Siemens XA "MFSPLIT": one series per volume);
    the image is named after one of them, and the others are found by the number of files
    dcm2niix reports for it ("Convert N DICOM as ..."): the neighbouring series (in series
    order) left without an image of their own whose files make up the difference. Sidecar-only
    runs print no such count: there, the following series of the same description left without
    an image are taken as stacked."""
    from pacs2bids.convert.facts import read_output

    outputs = []
    suffix: dict[str, str] = {}
    converted: dict[int, int] = {}
    for line in log_text.splitlines():
        m = _CONVERT_LINE.match(line.strip())
        if m:
            own = _owner(Path(m.group(2)).name, names)
            if own:
                converted[own[0]] = converted.get(own[0], 0) + int(m.group(1))
    for js in sorted(out.glob("*.json")):
        stem = js.name[: -len(".json")]
        own = _owner(stem, names)
        if own is None:
            continue  # a file the header scan did not take (unreadable, or not an image)
        k, suffix[stem] = own
        s = series[k]
        outputs.append(read_output(js.with_name(stem), s.uid, s.number))
    seen = {_owner(o.stem.name, names)[0] for o in outputs}
    orphan = [k not in seen for k in range(len(series))]
    merged: dict[int, int] = {}
    for k in sorted(converted):
        want = converted[k]
        if want <= len(series[k].files):
            continue
        found = None
        lo = k
        while found is None and lo >= 0 and (lo == k or orphan[lo]):
            total = sum(len(series[j].files) for j in range(lo, k + 1))
            hi = k
            while total < want and hi + 1 < len(series) and orphan[hi + 1]:
                hi += 1
                total += len(series[hi].files)
            if total == want:
                found = [j for j in range(lo, hi + 1) if j != k]
            lo -= 1
        for j in found or []:
            merged[j] = k
            orphan[j] = False
    if not converted:  # -b o prints no "Convert N DICOM" line: a run of same-named series without image
        for j in range(1, len(series)):
            if orphan[j] and (not orphan[j - 1] or j - 1 in merged) and series[j].description and \
                    series[j].description == series[j - 1].description:
                merged[j] = merged.get(j - 1, j - 1)
                orphan[j] = False
    return outputs, merged, suffix
