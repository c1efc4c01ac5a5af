"""Running a spec from a command: the exit codes, and the run with its printed summary.

Shared by :mod:`pacs2bids.cli` and :mod:`pacs2bids.demo`, which import it and not each other.

Exit codes: 0 completed; 1 failed, nothing published; 2 bad spec or usage; 3 completed with
failures (published, some series or studies listed as failed).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from uuid import UUID

from .config import load_spec
from .errors import Pacs2BidsError, SpecError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


def _prefect_defaults() -> None:
    """Settings for Prefect's ephemeral mode on a small machine with no outside network:
    a first start migrates a new database and can take longer than Prefect's default wait."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("NO_ET", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def run_spec(spec_path: Path, *, as_json: bool = False, replicate: bool = False, late_days: int | None = None) -> int:
    """Validate the spec, run the flow (``replicate``: ``replicate_project``, else ``extract_project``),
    print the summary; returns the exit code."""
    _prefect_defaults()
    try:
        load_spec(spec_path)  # refuse a bad spec before Prefect or the PACS is touched
    except SpecError as exc:
        print(f"pacs2bids: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from pacs2bids.flows.extract import RunFailed, extract_project

    from .progressview import show_progress

    try:
        with show_progress(sys.stderr):  # a bar on a terminal, progress lines otherwise
            if replicate:
                from pacs2bids.flows.replicate import replicate_project

                summary = replicate_project(str(spec_path), late_days)
            else:
                summary = extract_project(str(spec_path))
    except RunFailed as exc:
        summary = exc.summary
    except Pacs2BidsError as exc:
        print(f"pacs2bids: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # never a bare traceback without a summary: say what failed, how to see more
        logging.getLogger("pacs2bids").debug("run failed", exc_info=True)
        first = (str(exc).splitlines() or [""])[0][:300]
        print(f"pacs2bids: the run failed, nothing published: {type(exc).__name__}: {first} "
              "(run with -v for the traceback)", file=sys.stderr)
        return EXIT_FAILED
    print()
    print(json.dumps(summary, indent=2) if as_json else _format(summary))
    return {"completed": EXIT_OK, "completed with failures": EXIT_PARTIAL}.get(summary["state"], EXIT_FAILED)


def _format(summary: dict) -> str:
    from .run import RunSummary, SeriesLine

    s = RunSummary(project=summary["project"], run_id=summary["run_id"], output=summary["output"])
    for k in ("state", "studies", "already_published", "unmatched", "study_failures", "quarantined", "released",
              "awaiting_review", "dead_letter", "validator_warnings", "errors", "published"):
        setattr(s, k, summary[k])
    s.subjects = set(summary["subjects"])
    s.series = [SeriesLine(**line) for line in summary["series"]]
    return s.format()


# -- flow runs named and tagged after the project (issue 14): found by project in the Prefect UI ------------------

def _project_of(spec_path: str) -> str:
    """The spec's ``project`` key, read without resolving the spec (no secret, no inclusion list)."""
    import yaml

    try:
        data = yaml.safe_load(Path(spec_path).read_text(encoding="utf-8"))
        project = data.get("project") if isinstance(data, dict) else None
    except (OSError, yaml.YAMLError):
        project = None
    return str(project) if project else Path(spec_path).stem


def flow_run_name() -> str:
    """``<project>/<run id>``, the name of an extraction's or a replication's flow run (``flow_run_name=``);
    the flow takes its run id back from it (:func:`run_id_of_flow_run`)."""
    from prefect.runtime import flow_run

    from .run import RunContext

    spec_path = flow_run.parameters.get("spec_path", "")
    return f"{_project_of(spec_path)}/{RunContext.new_run_id(str(flow_run.id) if flow_run.id else None)}"


def run_id_of_flow_run(flow_run_id: str | None) -> str:
    """The run id the flow run's name holds (:func:`flow_run_name`), else a new one."""
    from prefect.runtime import flow_run

    from .run import RunContext

    name = (flow_run.name or "") if flow_run_id else ""
    run_id = name.rpartition("/")[2]
    if "/" in name and flow_run_id and run_id.endswith("-" + flow_run_id[:8]):
        return run_id
    return RunContext.new_run_id(flow_run_id)


def tag_flow_run(project: str) -> None:
    """Add the project to the running flow run's tags (a deployment's run, or one from the command)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    tags = sorted({*(flow_run.tags or []), project})
    with get_client(sync_client=True) as client:
        client.update_flow_run(UUID(str(flow_run.id)), tags=tags)
