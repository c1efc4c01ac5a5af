"""Protocol conformity QC (issue 15, REMI): every session of a BIDS dataset against the declared protocol.

Dataset-level step, run once every study is converted and the dataset finalised: each session
(``sub-X[/ses-Y]``) is read from what researchers receive (BIDS JSON sidecars, NIfTI headers and
voxels; never DICOM) and checked against ``spec.qc.protocol`` (:mod:`pacs2bids.config.qc`):

- an image is one NIfTI file; it belongs to the most specific protocol series whose suffix and
  entities it has (its other entities, e.g. ``run``, are not looked at);
- *missing*: fewer images than the series' ``count``; *duplicated*: more; *extra*: images of no series;
- *deviations*: parameters out of tolerance (or absent) on the images of a series.

Status per session: ``fail`` (missing series, deviations, or an image that cannot be read), ``warn``
(only duplicated or extra), ``pass``, or ``no protocol`` when the project declares none (indices and
snapshots are still written; an unreadable image still fails the session). The status informs; it
never stops the run (the validator and the leak scan are the gates).

Writes ``derivatives/pacs2bids-qc/``: ``dataset_description.json`` (derivative, GeneratedBy,
SourceDatasets), one ``sub-X[/ses-Y]/sub-X[_ses-Y]_qc.json`` per session (kept from the run before
when the session has not changed: :func:`fingerprint`), PNG snapshots in
``sub-X[/ses-Y]/figures/`` and one ``index.html`` (:mod:`pacs2bids.derivatives.qc_report`). The
validator does not know QC files: a ``.bidsignore`` names them, and the dataset has 0 errors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from nibabel.filebasedimages import ImageFileError

from pacs2bids.bids.dataset import write_derivative_description
from pacs2bids.config.qc import NIFTI_PARAMETERS, SIDECAR_PARAMETERS, Expected, ExpectedSeries, Protocol, QcSettings
from pacs2bids.derivatives import qc_indices
from pacs2bids.derivatives.qc_report import write_report
from pacs2bids.errors import ValidationFailed
from pacs2bids.provdoc import record_stage
from pacs2bids.validate import issue_text, validate_dataset

QC_DIR = Path("derivatives") / "pacs2bids-qc"
BIDSIGNORE = ["*.html", "**/figures", "*_qc.json"]  # the validator's matcher wants **/ for any depth
_EPS = 1e-9
NOT_MAGNITUDE = {"fieldmap", "phasediff", "phase1", "phase2", "phase"}  # Hz, radians: no SNR to speak of


@dataclass
class ImageQC:
    """One NIfTI image of a session: its name, the parameters read, its indices, its snapshot."""

    path: str  # relative to the dataset root
    suffix: str
    entities: dict[str, str]
    parameters: dict[str, object]
    indices: dict = field(default_factory=dict)
    snapshot: str | None = None  # relative to the QC folder
    series: str | None = None  # the protocol series it belongs to
    error: str | None = None  # why it could not be read (then it has no parameters)

    @property
    def name(self) -> str:
        return Path(self.path).name.split(".")[0]


@dataclass
class SessionQC:
    subject: str
    session: str | None
    status: str = "no protocol"
    images: list[ImageQC] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)
    duplicated: list[dict] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    deviations: list[dict] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    fingerprint: str = ""
    reused: bool = False  # its QC of an earlier run was still true, and kept

    @property
    def label(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def folder(self) -> Path:
        return Path(f"sub-{self.subject}") / (f"ses-{self.session}" if self.session else "")

    @property
    def deviated(self) -> set[tuple[str, str]]:
        """(image name, parameter) of every deviation."""
        return {(d["Image"], d["Parameter"]) for d in self.deviations}

    @property
    def json(self) -> str:
        """Its JSON, relative to the QC folder."""
        return (self.folder / f"{self.label}_qc.json").as_posix()

    def to_dict(self) -> dict:
        return {"Subject": self.subject, "Session": self.session, "Status": self.status,
                "Missing": self.missing, "Duplicated": self.duplicated, "Extra": self.extra,
                "Deviations": self.deviations, "Unreadable": self.unreadable, "QcSeconds": round(self.seconds, 3),
                "Fingerprint": self.fingerprint,
                "Images": [{"Path": i.path, "ProtocolSeries": i.series, "Parameters": i.parameters,
                            "Indices": i.indices, "Snapshot": i.snapshot, "Error": i.error} for i in self.images]}

    @classmethod
    def from_dict(cls, d: dict) -> "SessionQC":
        """A session's QC as its JSON holds it (:meth:`to_dict`)."""
        images = []
        for i in d["Images"]:
            entities, suffix = parse_name(Path(i["Path"]).name)
            images.append(ImageQC(i["Path"], suffix, entities, i["Parameters"], i["Indices"], i["Snapshot"],
                                  i["ProtocolSeries"], i["Error"]))
        return cls(d["Subject"], d["Session"], d["Status"], images, d["Missing"], d["Duplicated"], d["Extra"],
                   d["Deviations"], d["Unreadable"], d["QcSeconds"], d["Fingerprint"], reused=True)


@dataclass
class QcResult:
    folder: Path
    sessions: list[SessionQC]
    seconds: float

    @property
    def seconds_per_session(self) -> float:
        return self.seconds / len(self.sessions) if self.sessions else 0.0

    def summary(self) -> dict:
        """Plain values for the run summary: sessions per status, QC seconds per session."""
        statuses: dict[str, int] = {}
        for s in self.sessions:
            statuses[s.status] = statuses.get(s.status, 0) + 1
        return {"statuses": statuses, "sessions": len(self.sessions), "reused": sum(s.reused for s in self.sessions),
                "seconds_per_session": round(self.seconds_per_session, 3)}


def parse_name(filename: str) -> tuple[dict[str, str], str]:
    """Entities (without ``sub`` and ``ses``) and suffix of a BIDS file name."""
    parts = filename.split(".")[0].split("_")
    entities = dict(p.split("-", 1) for p in parts[:-1] if "-" in p)
    entities.pop("sub", None)
    entities.pop("ses", None)
    return entities, parts[-1]


def matches(expected: ExpectedSeries, entities: dict[str, str], suffix: str) -> bool:
    return suffix == expected.suffix and all(entities.get(k) == v for k, v in expected.entities.items())


def check_value(expected: Expected, actual) -> str | None:
    """Why ``actual`` is out of ``expected`` (``None``: within). Numbers: ``|actual - value|`` at most
    ``max(tolerance, relative * |value|)`` (the edge is within), per axis for lists."""
    if actual is None:
        return "absent"
    if expected.regex is not None:
        return None if re.fullmatch(expected.regex, str(actual)) else f"does not match /{expected.regex}/"
    want = expected.value
    if isinstance(want, str):
        return None if str(actual) == want else f"expected {want!r}"
    wants = want if isinstance(want, list) else [want]
    gots = actual if isinstance(actual, (list, tuple)) else [actual]
    if len(wants) != len(gots):
        return f"expected {len(wants)} value(s), found {len(gots)}"
    for w, g in zip(wants, gots):
        try:
            g = float(g)
        except (TypeError, ValueError):
            return f"not a number, expected {want}"
        allowed = max(expected.tolerance, expected.relative * abs(w))
        if not math.isfinite(g) or abs(g - w) > allowed + _EPS * max(1.0, abs(w)):
            return f"expected {want}" + (f" ± {allowed:g}" if allowed else "")
    return None


def read_image(root: Path, nifti: Path, extra: set[str], settings: QcSettings, out: Path) -> ImageQC:
    """The parameters (sidecar and header), indices and snapshot of one image."""
    stem = nifti.name.split(".")[0]
    sidecar_path = nifti.with_name(stem + ".json")
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    vol, zooms, shape = qc_indices.load(nifti)
    params: dict[str, object] = {k: sidecar.get(k) for k in (*SIDECAR_PARAMETERS, *sorted(extra))
                                 if k not in NIFTI_PARAMETERS}
    params.update(VoxelSize=list(zooms), Matrix=list(shape))
    entities, suffix = parse_name(nifti.name)
    rel = nifti.relative_to(root)
    if suffix in NOT_MAGNITUDE or entities.get("part") in ("phase", "imag", "real"):
        indices = qc_indices.ImageIndices(None, None, None, 0, 0, "not a magnitude image: no SNR or ghosting")
    else:
        indices = qc_indices.indices(vol, sidecar)
    image = ImageQC(str(rel), suffix, entities, params, indices.to_dict())
    if settings.snapshots:
        png = Path(rel.parts[0]) / Path(*rel.parts[1:-2]) / "figures" / f"{stem}_qc.png"
        qc_indices.snapshot(vol, zooms, out / png)
        image.snapshot = png.as_posix()
    return image


def check_session(protocol: Protocol | None, qc: SessionQC) -> SessionQC:
    """Fill ``qc``'s missing, duplicated, extra, deviations and status from its images."""
    if protocol is None:
        qc.status = "fail" if qc.unreadable else "no protocol"
        return qc
    by_series: dict[str, list[ImageQC]] = {s.match: [] for s in protocol.series}
    specific = sorted(protocol.series, key=lambda s: -len(s.entities))
    for image in qc.images:
        found = next((s for s in specific if matches(s, image.entities, image.suffix)), None)
        if found is None:
            qc.extra.append(image.name)
            continue
        image.series = found.match
        by_series[found.match].append(image)
    for s in protocol.series:
        images = by_series[s.match]
        if len(images) < s.count:
            qc.missing.append({"Series": s.match, "Expected": s.count, "Found": len(images)})
        elif len(images) > s.count:
            qc.duplicated.append({"Series": s.match, "Expected": s.count, "Found": len(images),
                                  "Images": [i.name for i in images]})
        wanted = {**protocol.parameters, **s.parameters}
        for image in (i for i in images if i.error is None):  # an unreadable one is reported as such
            for name, expected in wanted.items():
                why = check_value(expected, image.parameters.get(name))
                if why:
                    qc.deviations.append({"Image": image.name, "Series": s.match, "Parameter": name,
                                          "Value": image.parameters.get(name), "Reason": why})
    failed, warned = qc.missing or qc.deviations or qc.unreadable, qc.duplicated or qc.extra
    qc.status = "fail" if failed else "warn" if warned else "pass"
    return qc


def session_folders(root: Path) -> list[tuple[str, str | None, Path]]:
    """(subject, session, folder) of every session of the dataset, sorted."""
    out = []
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        sessions = sorted(p for p in sub.glob("ses-*") if p.is_dir())
        subject = sub.name.removeprefix("sub-")
        out += [(subject, s.name.removeprefix("ses-"), s) for s in sessions] or [(subject, None, sub)]
    return out


def _protocol_parameters(protocol: Protocol | None) -> set[str]:
    if protocol is None:
        return set()
    return set(protocol.parameters) | {k for s in protocol.series for k in s.parameters}


def fingerprint(root: Path, folder: Path, settings: QcSettings, generated_by: dict) -> str:
    """What a session's QC depends on: its files (path, size, modification time: a run's seed copy keeps
    them, a new conversion or sidecar edit changes them), the QC settings and the tool's version."""
    h = hashlib.sha256(settings.model_dump_json().encode() + json.dumps(generated_by, sort_keys=True).encode())
    for p in sorted(folder.glob("*/*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _earlier(out: Path, qc: SessionQC) -> SessionQC | None:
    """The session's QC of an earlier run when it is still true (same fingerprint, snapshots there)."""
    try:
        kept = SessionQC.from_dict(json.loads((out / qc.json).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if kept.fingerprint != qc.fingerprint or any(i.snapshot and not (out / i.snapshot).is_file()
                                                 for i in kept.images):
        return None
    return kept


def qc_session(root: Path, subject: str, session: str | None, folder: Path, settings: QcSettings,
               out: Path, generated_by: dict) -> SessionQC:
    """QC of one session: read every image, check, write its JSON; or the earlier run's QC, when nothing it
    depends on has changed (:func:`fingerprint`). Times itself."""
    start = time.perf_counter()
    qc = SessionQC(subject, session, fingerprint=fingerprint(root, folder, settings, generated_by))
    kept = _earlier(out, qc)
    if kept is not None:
        return kept
    shutil.rmtree(out / qc.folder / "figures", ignore_errors=True)
    extra = _protocol_parameters(settings.protocol)
    for nifti in sorted(folder.glob("*/*.nii*")):
        if not nifti.name.endswith((".nii", ".nii.gz")):
            continue
        try:
            qc.images.append(read_image(root, nifti, extra, settings, out))
        except (OSError, ValueError, TypeError, EOFError, ImageFileError) as exc:  # JSONDecodeError: ValueError
            entities, suffix = parse_name(nifti.name)
            why = f"could not be read ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
            qc.images.append(ImageQC(str(nifti.relative_to(root)), suffix, entities, {}, error=why))
            qc.unreadable.append({"Image": qc.images[-1].name, "Reason": why})
    check_session(settings.protocol, qc)
    qc.seconds = time.perf_counter() - start
    path = out / qc.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(qc.to_dict(), indent=2, default=str) + "\n")
    return qc


def _remove_stale(out: Path, found: list[tuple[str, str | None, Path]]) -> None:
    """QC folders of subjects or sessions the dataset no longer holds."""
    subjects = {f"sub-{sub}": {f"ses-{ses}" for s2, ses, _ in found if s2 == sub and ses} for sub, _, _ in found}
    for sub in (p for p in out.glob("sub-*") if p.is_dir()):
        if sub.name not in subjects:
            shutil.rmtree(sub)
            continue
        for ses in (p for p in sub.glob("ses-*") if p.is_dir() and p.name not in subjects[sub.name]):
            shutil.rmtree(ses)


def write_description(out: Path, generated_by: dict) -> None:
    write_derivative_description(out, "pacs2bids protocol conformity QC", generated_by=[
        {**generated_by, "Description": "protocol conformity QC and image indices"}])
    (out / ".bidsignore").write_text("\n".join(BIDSIGNORE) + "\n")
    (out / "README").write_text(
        "Protocol conformity QC written by pacs2bids: one JSON per session (missing, duplicated and extra\n"
        "series, parameters out of tolerance, image indices), PNG snapshots, and index.html, the report to\n"
        "open in a browser. Parameters are read from the BIDS sidecars and NIfTI headers of the dataset.\n")


def check_qc_dataset(folder: Path) -> None:
    """The real BIDS validator on the QC derivative (the raw dataset's validation does not look into
    ``derivatives/``); raises :class:`ValidationFailed` naming the QC folder and the first errors."""
    report = validate_dataset(folder)
    if report.errors:
        raise ValidationFailed(f"the QC derivative {QC_DIR} is not valid BIDS: "
                               + "; ".join(issue_text(e) for e in report.errors[:10]))


def run_qc(root: Path, settings: QcSettings, generated_by: dict) -> QcResult:
    """QC of every session of the BIDS dataset at ``root``, into ``root/derivatives/pacs2bids-qc``: a
    session whose files and settings are those of its earlier QC keeps it; the report is rewritten."""
    start, began = time.perf_counter(), datetime.now(timezone.utc)
    root = Path(root)
    out = root / QC_DIR
    out.mkdir(parents=True, exist_ok=True)
    found = session_folders(root)
    _remove_stale(out, found)
    sessions = [qc_session(root, sub, ses, folder, settings, out, generated_by) for sub, ses, folder in found]
    write_description(out, generated_by)
    write_report(out, sessions, settings.protocol is not None)
    _record_provenance(root, out, [s for s in sessions if not s.reused], settings, generated_by, began)
    return QcResult(out, sessions, time.perf_counter() - start)


def _record_provenance(root: Path, out: Path, fresh: list[SessionQC], settings: QcSettings, generated_by: dict,
                       began: datetime) -> None:
    """W3C PROV (issue 15): the images this run checked -> their sessions' QC JSON and the report."""
    if not fresh:
        return
    outputs = [(out / s.json).relative_to(root) for s in fresh] + [(out / "index.html").relative_to(root)]
    record_stage(root, "qc", tool=generated_by.get("Name", "pacs2bids"), version=generated_by.get("Version"),
                 inputs=[i.path for s in fresh for i in s.images if not i.error], outputs=outputs,
                 started=began, ended=datetime.now(timezone.utc),
                 parameters={"protocol": settings.protocol is not None, "sessions": len(fresh)})
