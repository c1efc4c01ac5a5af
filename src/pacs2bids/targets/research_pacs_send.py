"""How instances reach a research PACS: C-STORE (PS3.4 B.2, pynetdicom) or STOW-RS (PS3.18 10.5,
dicomweb-client), and what the PACS holds: C-FIND at IMAGE level or QIDO-RS at instance level.

Each peer reads the PACS's answer per instance into a :class:`Push` (the judgement is in
:mod:`pacs2bids.targets.research_pacs`'s docstring); losing the PACS mid-push raises a transient
:class:`~pacs2bids.errors.PacsError`. :mod:`pacs2bids.targets.research_pacs` uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pydicom
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom import status as pstatus
from pynetdicom.pdu_primitives import A_ASSOCIATE

from ..config import DicomwebSettings, DimseSettings
from ..errors import PacsError
from ..pacs import services
from ..pacs.dicomweb import WebPacs, make_session
from ..pacs.pool import pool_for
from ..pacs.status import classify, peer
from ..pacs.tls import client_context

_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2
DUPLICATE = 0x0111  # PS3.7 C.5.8: the PACS already holds this SOP instance


def store_meaning(code: int) -> str:
    """A C-STORE status in words (PS3.4 B.2.3, PS3.7 C), with its code."""
    table = {**pstatus.GENERAL_STATUS, **pstatus.STORAGE_SERVICE_CLASS_STATUS}
    category, text = table.get(code, ("Failure", ""))
    return f"{(text or category).lower()} (0x{code:04X})"


@dataclass
class Push:
    """Per-instance outcome of one push, filled by a peer's ``send``."""

    on_sent: Callable[[int], None] | None = None
    sent: list = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)

    def answered(self, inst, failure: str | None = None, warning: str | None = None) -> None:
        self.sent.append(inst)
        if failure:
            self.failed[inst.path] = failure
        if warning:
            self.warnings[inst.path] = warning
        if self.on_sent is not None:
            self.on_sent(len(self.sent))


# -- DIMSE ----------------------------------------------------------------------------------
class DimsePeer:
    method = "C-STORE"

    def __init__(self, target):
        self.settings = DimseSettings(ae_title=target.ae_title, host=target.host, port=target.port,
                                      calling_ae_title=target.calling_ae_title, timeout=target.timeout,
                                      max_associations=1, tls=target.tls)

    def counts(self, study: str) -> dict[str, int | None]:
        """Series UID -> instances the PACS holds in it (C-FIND, SERIES level, PS3.4 C.4.1;
        None when it does not say: NumberOfSeriesRelatedInstances is optional, C.6.1.1.4)."""
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID, ident.SeriesInstanceUID, ident.NumberOfSeriesRelatedInstances = study, "", ""
        return _counts(services.find(self.settings, ident).matches)

    def held(self, study: str, series: str) -> set[str]:
        """SOP Instance UIDs the PACS holds in one series (C-FIND, IMAGE level, PS3.4 C.4.1)."""
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID, ident.SeriesInstanceUID, ident.SOPInstanceUID = study, series, ""
        result = services.find(self.settings, ident)
        return {str(m.SOPInstanceUID) for m in result.matches if m.get("SOPInstanceUID")}

    def close(self) -> None:
        pool_for(self.settings).close()

    def send(self, version: Path, todo: list, push: Push) -> None:
        """C-STORE each instance; one association per 128 (SOP class, transfer syntax) pairs."""
        pairs = sorted({(i.sop_class, i.syntax) for i in todo})
        for start in range(0, len(pairs), _MAX_CONTEXTS):
            group = set(pairs[start:start + _MAX_CONTEXTS])
            assoc = self._associate(group)
            try:
                for inst in (i for i in todo if (i.sop_class, i.syntax) in group):
                    self._store(assoc, version, inst, push)
            finally:
                if assoc.is_established:
                    assoc.release()

    def _store(self, assoc, version: Path, inst, push: Push) -> None:
        status = Dataset()
        try:
            if assoc.is_established:
                status = assoc.send_c_store(version / inst.path)
        except ValueError:
            push.failed[inst.path] = (f"the PACS accepted no presentation context for SOP class {inst.sop_class} "
                                      f"in transfer syntax {inst.syntax}")
            return
        except RuntimeError:  # the association ended between the check and the request
            pass
        if "Status" not in status:  # no answer: the association was lost
            raise PacsError(f"{peer(self.settings)} aborted the association or did not answer a C-STORE within "
                            f"{self.settings.timeout:.0f} s, after {len(push.sent)} instance(s); check that it is "
                            "running, then run again: what it holds is not sent again", transient=True)
        code = int(status.Status)
        info = classify(code)
        if info.category == "success" or code == DUPLICATE:
            push.answered(inst)
        elif info.category == "warning":
            push.answered(inst, warning=store_meaning(code))
        else:
            push.answered(inst, failure=store_meaning(code))

    def _associate(self, pairs: set[tuple[str, str]]):
        s = self.settings
        ae = AE(ae_title=s.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = s.timeout
        ae.connection_timeout = min(s.timeout, 30.0)
        rejection: dict = {}

        def on_acse(event):
            p = event.primitive
            if isinstance(p, A_ASSOCIATE) and p.result in (0x01, 0x02):
                rejection.update(result=p.result_str, reason=p.reason_str, transient=p.result == 2)

        contexts = [build_context(cls, [ts]) for cls, ts in sorted(pairs)]
        try:
            tls_args = client_context(s.tls, s.host, "targets[].tls") if s.tls is not None else None
            assoc = ae.associate(s.host, s.port, contexts=contexts, ae_title=s.ae_title,
                                 evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)], tls_args=tls_args)
        except OSError as exc:
            raise PacsError(f"cannot reach {peer(s)}: {exc.strerror or exc}; check its host name", transient=False) from None
        if assoc.is_established:
            return assoc
        if rejection:
            raise PacsError(f"{peer(s)} rejected the storage association ({rejection['result']}: "
                            f"{rejection['reason']}); check its AE title {s.ae_title!r} and that it knows our "
                            f"calling AE title {s.calling_ae_title!r}", transient=rejection["transient"])
        raise PacsError(f"cannot open a storage association with {peer(s)}: connection refused or no answer within "
                        f"{s.timeout:.0f} s; check that it is running and the host and port", transient=True)


# -- DICOMweb -------------------------------------------------------------------------------
class _TargetWebPacs(WebPacs):
    """:class:`WebPacs` whose 401/403 message names where this target's credentials come from."""

    credentials = ""

    def _error(self, what: str, exc: Exception) -> PacsError:
        err = super()._error(what, exc)
        if err.status in (401, 403):
            return PacsError(f"DICOMweb {self.settings.url}: {what} refused (HTTP {err.status}); check the user "
                             f"name and password in {self.credentials} and the account's rights", status=err.status)
        return err


class WebPeer:
    method = "STOW-RS"

    def __init__(self, target, environ, block=None):
        self.target = target
        settings = DicomwebSettings(url=target.url, username_env=target.username_env,
                                    password_env=target.password_env, timeout=target.timeout)
        if block is not None:  # a Prefect Secret block's credentials instead of the environment
            if not {"username", "password"} <= set(block):
                raise PacsError(f"DICOMweb {target.url}: the Prefect block {target.credentials_block} holds no "
                                "username and password; store them there as JSON {username, password}")
            session = requests.Session()
            session.auth = (block["username"], block["password"])
            where = f"the Prefect block {target.credentials_block}"
        else:
            session = make_session(settings, environ)
            names = [n for n in (target.username_env, target.password_env) if n]
            where = (f"the environment variable(s) {' / '.join(names)}" if names else
                     "the spec: none given (set username_env and password_env, or credentials_block)")
        self.web = _TargetWebPacs(settings, session)
        self.web.credentials = where

    def counts(self, study: str) -> dict[str, int | None]:
        """Series UID -> instances the PACS holds in it (QIDO-RS of the study's series, PS3.18 10.6)."""
        return _counts(self.web.search("series", {}, ["0020000E", "00201209"], study_uid=study))

    def held(self, study: str, series: str) -> set[str]:
        """SOP Instance UIDs the PACS holds in one series (QIDO-RS at instance level, PS3.18 10.6)."""
        found = self.web.search("instances", {}, ["00080018"], study_uid=study, series_uid=series)
        return {str(d.SOPInstanceUID) for d in found if d.get("SOPInstanceUID")}

    def close(self) -> None:
        self.web.session.close()

    def send(self, version: Path, todo: list, push: Push) -> None:
        for batch in _batches(todo, self.target.batch_instances, self.target.batch_megabytes << 20):
            datasets = [pydicom.dcmread(version / i.path) for i in batch]
            answer = self._post(datasets, done=len(push.sent))
            self._judge(batch, answer, push)

    def _post(self, datasets: list[Dataset], done: int) -> Dataset:
        try:
            with self.web._slot():
                return self.web.client.store_instances(datasets)
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 409:  # PS3.18 10.5.3: all failed
                try:
                    return Dataset.from_json(exc.response.json())
                except ValueError:
                    pass
            raise _after(self.web._error("STOW-RS", exc), done) from None
        except (requests.RequestException, OSError) as exc:
            raise _after(self.web._error("STOW-RS", exc), done) from None

    @staticmethod
    def _judge(batch: list, answer: Dataset, push: Push) -> None:
        """Read the STOW-RS answer per instance (PS3.18 10.5.3, Table 10.5.3-1)."""
        stored = {str(i.ReferencedSOPInstanceUID): i for i in answer.get("ReferencedSOPSequence", [])}
        failed = {str(i.ReferencedSOPInstanceUID): i for i in answer.get("FailedSOPSequence", [])}
        for inst in batch:
            if inst.sop in failed:
                reason = failed[inst.sop].get("FailureReason")
                if reason == DUPLICATE:
                    push.answered(inst)
                else:
                    push.answered(inst, failure=store_meaning(int(reason)) if reason is not None else "failed")
            elif inst.sop in stored:
                warning = stored[inst.sop].get("WarningReason")
                push.answered(inst, warning=store_meaning(int(warning)) if warning is not None else None)
            else:
                push.answered(inst, failure="not acknowledged: the STOW-RS answer lists it neither as stored "
                                            "nor as failed")


def _counts(matches: Iterable[Dataset]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for m in matches:
        if m.get("SeriesInstanceUID"):
            n = m.get("NumberOfSeriesRelatedInstances")
            out[str(m.SeriesInstanceUID)] = int(n) if n not in (None, "") else None
    return out


def _after(exc: PacsError, done: int) -> PacsError:
    return PacsError(f"{exc} (after {done} instance(s) sent; run again: what the PACS holds is not sent again)",
                     transient=exc.transient, status=exc.status)


def _batches(todo: list, count: int, size: int) -> Iterable[list]:
    batch: list = []
    total = 0
    for inst in todo:
        if batch and (len(batch) >= count or total + inst.size > size):
            yield batch
            batch, total = [], 0
        batch.append(inst)
        total += inst.size
    if batch:
        yield batch
