"""Flow ``extract_project``: one research project from the PACS to a published BIDS dataset.

It only orchestrates, in the order of docs/ARCHITECTURE.md: load the spec → take the PACS's
concurrency limit → query → one ``extract_study`` per study (retrieve into its private raw
folder, pseudonymise into the staging ``sourcedata/``, convert, provenance:
:mod:`pacs2bids.study`) → collect → files released from quarantine → finalise → validate →
lineage → leak scan (the last gate, lineage tables and run summary included) → publish (atomic
swap into ``output``) → cleanup. Each outcome is recorded once (:mod:`pacs2bids.recorder`),
as a summary line and lineage rows.

Side effects: writes the private work folder beside ``output`` (raw files, quarantine,
staging), the encrypted matching key, and, when the run succeeds, the dataset in ``output``.
Nothing is written to ``output`` if the PACS cannot be reached, a leak is found, or the
validator reports errors.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from prefect import flow, runtime
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from pacs2bids import __version__, audit
from pacs2bids.bids.provenance import write_run_provenance
from pacs2bids.config import load_spec
from pacs2bids.deadletter import DeadLetters
from pacs2bids.pacs import close_pools
from pacs2bids.errors import LeakDetected, NothingToPublish, Pacs2BidsError, RunFailed
from pacs2bids.heuristic_path import heuristic_sha256
from pacs2bids.launch import flow_run_name, run_id_of_flow_run, tag_flow_run
from pacs2bids.logsafety import quiet_third_party_loggers
from pacs2bids.memory import tune_malloc
from pacs2bids.publish import current_version, seed_staging, staging_dir, work_area, write_marker
from pacs2bids.recorder import Outcomes, Recorder
from pacs2bids.register import skip_already_published
from pacs2bids.released import awaiting_review, mark_published, project_quarantine
from pacs2bids.run import META, TIMELINE_ENV, RunContext, RunSummary, assign_sessions, study_timeline
from pacs2bids.runlog import close_run_log, run_log, summary_artifact
from pacs2bids.staging import assemble, share_key_store
from pacs2bids.study import StudyResult, longest_first, remove_raw
from pacs2bids.versions import tool_versions
from pacs2bids.tasks.bids import finalise_dataset
from pacs2bids.tasks.deid import scan_for_leaks
from pacs2bids.tasks.lineage import record_lineage
from pacs2bids.tasks.publish import publish_local
from pacs2bids.tasks.qc import run_qc
from pacs2bids.tasks.query import find_studies
from pacs2bids.tasks.released import include_released
from pacs2bids.tasks.pacs_limit import use_pacs_limit
from pacs2bids.tasks.progress import track_progress
from pacs2bids.tasks.runner import study_runner, submit_study
from pacs2bids.tasks.targets import publish_target
from pacs2bids.tasks.validate import validate_dataset

__all__ = ["extract_project", "RunFailed", "NothingToPublish"]


@flow(name="extract_project", flow_run_name=flow_run_name, task_runner=ThreadPoolTaskRunner(max_workers=4),
      log_prints=False)
def extract_project(spec_path: str, since: dict[int, str] | None = None) -> dict:
    """Extract one project end to end; returns the run summary (pseudonymised, JSON-ready).
    ``since`` (inclusion row -> ISO day): those rows are asked only for studies from that day on
    (set by ``replicate_project``, :mod:`pacs2bids.replicate`).

    Raises :class:`RunFailed` (carrying the summary) when nothing could be published.
    """
    quiet_third_party_loggers()  # also under a Prefect worker, without the CLI
    tune_malloc()  # large blocks mapped alone, heaps trimmed past 1 MB: freed memory returned (pacs2bids.memory)
    logger = get_run_logger()
    spec = load_spec(spec_path)
    versions = tool_versions()
    logger.info("versions: %s", ", ".join(f"{k} {v}" for k, v in versions.items()))
    use_pacs_limit(spec)  # every connection to the PACS holds a slot of its limit, shared by every run

    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    run_id = run_id_of_flow_run(flow_run_id)  # the one its flow run's name holds
    tag_flow_run(spec.project)
    ctx = RunContext(spec, run_id, flow_run_id, staging_dir(spec.output, spec.resolved_work_dir, run_id), versions)
    summary = RunSummary(project=spec.project, run_id=run_id, output=str(spec.output), started=ctx.started)
    outcomes = Outcomes(series=summary.series, quarantined=summary.quarantined,
                        study_failures=summary.study_failures, released=summary.released,
                        derivatives=summary.derivatives)
    dead_letters = DeadLetters(ctx.work / "dead-letter.json")
    try:
        with work_area(ctx, seed=False), run_log(ctx.staging / META / "logs" / f"run-{run_id}.log"):
            try:
                results, seeded = _extract_studies(ctx, summary, outcomes, logger, since)
                with summary.timed("released"):
                    released = include_released(spec, ctx)
                outcomes.extend(released.outcomes)
                summary.awaiting_review = awaiting_review(spec, ctx.quarantine)
                dead = dead_letters.fold(outcomes.records, run_id=run_id)
                summary.dead_letter = [asdict(e) for e in dead]
                parts = [r.instances_part for r in [*results, released] if r.instances_part]
                if not seeded and current_version(spec.output) is not None:
                    summary.unchanged = True  # nothing new: no revalidation, no new version (issue 13)
                    summary.finish()
                    logger.info("nothing new since the last run: the published dataset is left as it is")
                else:
                    _check_and_publish(ctx, summary, Recorder(outcomes=outcomes), parts)
            except Pacs2BidsError as exc:
                summary.errors.append(str(exc))
                summary.finish()
                _write_summary(ctx, summary, logger)
                logger.error("run %s failed, nothing published: %s", run_id, exc)
                raise RunFailed(str(exc), summary.to_dict()) from None
    finally:
        close_pools()  # idle associations would hold the PACS's slots until the reaper's turn
    _publish_targets(spec, summary)  # the local version, now current, to each secondary target
    remove_raw([f for r in results for f in r.raw_done])  # the clinical copy goes once its research copy is published
    mark_published(spec, ctx.quarantine, released.included, run_id)
    dead_letters.save(dead)
    _write_summary(ctx, summary, logger)
    logger.info("%s", summary.format())
    return summary.to_dict()


def _extract_studies(ctx: RunContext, summary: RunSummary, outcomes: Outcomes,
                     logger, since: dict[int, str] | None = None) -> tuple[list[StudyResult], bool]:
    """Query, skip what the dataset holds already, then one ``extract_study`` per study. Staging is
    seeded from the published dataset only when there is something new (studies, released files):
    returns the results and whether it was."""
    spec = ctx.spec
    with summary.timed("query"):
        found = find_studies(spec, since)
    summary.unmatched = [{"row": i.row, "subject": i.subject} for i in found.unmatched]
    summary.unapplied_filters = [asdict(u) for u in found.unapplied]  # included, listed (query.py)
    for i in found.unmatched:
        logger.warning("inclusion row %d (sub-%s): no study matched", i.row, i.subject)
    todo = skip_already_published(spec, assign_sessions(found.studies))
    summary.already_published = todo.already_published
    summary.subjects |= todo.subjects
    if todo.already_published:
        logger.info("%d series already published by an earlier run: not retrieved again", todo.already_published)
    summary.studies = len(todo.studies)
    summary.subjects |= {s.subject for s in todo.studies}
    logger.info("%d studies of %d subjects selected", len(todo.studies), len(summary.subjects))
    seeded = bool(todo.studies or project_quarantine(spec, ctx.quarantine).released())
    if seeded:  # something new: the run starts from the published dataset (a no-op run copies nothing)
        seed_staging(spec.output, ctx.staging, merge=True)

    with track_progress(spec.project, ctx.run_id, todo.studies, logger), study_runner(spec, todo.studies) as runner:
        share_key_store(ctx, todo.studies)  # remote staging: the matching key the workers start from (issue 14)
        order, t0 = longest_first(todo.studies), time.time()  # the largest study first: LPT (issue 12)
        futures = {i: submit_study(runner, spec, todo.studies[i], ctx) for i in order}  # threads or Dask (issue 14)
        results = [futures[i].result() for i in range(len(todo.studies))]  # the query's order, as before
    if os.environ.get(TIMELINE_ENV) == "1":
        summary.timeline = study_timeline(todo.studies, results, order, t0)
    results = assemble(ctx, todo.studies, results)  # remote staging: each study's part into staging (issue 14)
    for r in results:  # every study's retrieval outcomes, then every study's conversion outcomes
        outcomes.extend(r.retrieval)
        summary.add_seconds(r.seconds)
    for r in results:
        outcomes.extend(r.conversion)
    return results, seeded


def _check_and_publish(ctx: RunContext, summary: RunSummary, recorder: Recorder, instance_parts: list[str]) -> None:
    """Finalise, validate, record lineage, scan for leaks and publish the staging dataset."""
    spec, staging = ctx.spec, ctx.staging
    participants = sorted(p.name.removeprefix("sub-") for p in staging.glob("sub-*") if p.is_dir())
    if not participants:  # subjects with images, this run's or earlier
        raise NothingToPublish(
            "no series could be converted, so there is no dataset to publish: see the series, studies and "
            "inclusions listed in this summary"
        )
    with summary.timed("finalise"):
        finalise_dataset(staging, spec.dataset_name or spec.project, participants,
                         {"Name": "pacs2bids", "Version": __version__})
        write_run_provenance(staging, run_id=ctx.run_id, flow_run_id=ctx.flow_run_id, started=ctx.started,
                             parameters={"project": spec.project, "heuristic": str(spec.heuristic)})
    if spec.qc.enabled:  # dataset-level: every session, before the validator and the leak scan see it
        with summary.timed("qc"):
            qc = run_qc(staging, spec.qc, {"Name": "pacs2bids", "Version": __version__})
        summary.stage_seconds["qc_per_session"] = qc["seconds_per_session"]
    with summary.timed("validate"):
        report = validate_dataset(staging)
    summary.validator_warnings = report.warning_counts()
    report.check()
    recorder.mark_published()
    summary.published = True
    summary.finish()
    summary.write(staging / META / "runs" / f"run-{ctx.run_id}.json")
    with summary.timed("lineage"):
        record_lineage(staging, recorder.outcomes.records, instance_parts, run_id=ctx.run_id, project=spec.project,
                       flow_run_id=ctx.flow_run_id, pacs2bids_version=__version__,
                       heuristic_sha256=heuristic_sha256(spec.heuristic, spec.sidecar_fields))
    # the last gate: after the lineage tables and the run summary are written, so they are scanned too
    write_marker(staging, spec.project, spec.secret_bytes)  # whose dataset this is (keyed, not the key)
    close_run_log(staging)  # the log is scanned and published as it is now: nothing is appended after the scan
    with summary.timed("leak_scan"):
        hits = scan_for_leaks(spec, staging)
    if hits:
        summary.published = False
        where = "; ".join(f"{h.path} ({h.field}, {h.kind})" for h in hits[:10])
        raise LeakDetected(f"{len(hits)} identifying value(s) found before publishing: {where}")
    with summary.timed("publish"):
        publish_local(staging, spec.output, ctx.run_id)


def _publish_targets(spec, summary: RunSummary) -> None:
    """One ``publish_target`` per secondary target, at once; a failed one makes the run "completed with
    failures" (the local dataset is published, and the next run resumes the target)."""
    version = current_version(spec.output)
    if not spec.targets or version is None:
        return
    with summary.timed("targets"):
        futures = [publish_target.submit(spec, i, version) for i in range(len(spec.targets))]
        summary.targets = [f.result() for f in futures]
    if any(t["state"] == "failed" for t in summary.targets) and summary.state == "completed":
        summary.state = "completed with failures"


def _write_summary(ctx: RunContext, summary: RunSummary, logger) -> None:
    summary.write(ctx.summary_path)
    audit.record_run(ctx.spec, summary)  # who ran it, what was published where (issue 14)
    summary_artifact(ctx.spec.project, summary, logger)
