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
from typing import NoReturn
from uuid import UUID

from . import prefectserver
from .errors import Pacs2BidsError, SpecError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


def _prefect_defaults() -> bool:
    """Settings for Prefect's ephemeral mode on a small machine with no outside network:
    a first start migrates a new database and can take longer than Prefect's default wait.
    True when migrations are switched off for this run (the caller unsets it after the run)."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("NO_ET", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    marker = _migrated_marker()
    if marker is not None and marker.is_file() and marker.read_text().strip() == _prefect_version():
        # this Prefect version has already brought the database up to date: its ephemeral server
        # need not run the migrations again (a third of its start-up on a small machine), nor register
        # the block types again (loading every Prefect collection to see whether they changed: about
        # 1 s of the server's CPU; a block saved later registers its own type)
        if "PREFECT_API_DATABASE_MIGRATE_ON_START" not in os.environ:
            for name, value in REPEAT_START.items():
                if name not in os.environ:
                    os.environ[name] = value
                    _SET_FOR_THE_RUN.add(name)
            return True
    return False


#: Prefect's settings for a repeated start on a database this Prefect version migrated (:func:`_prefect_defaults`).
REPEAT_START = {"PREFECT_API_DATABASE_MIGRATE_ON_START": "false", "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
                "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"}
_SET_FOR_THE_RUN: set[str] = set()


def _unset_repeat_start() -> None:
    """Unset what :func:`_prefect_defaults` set for one run (another PREFECT_HOME in this process may be new)."""
    while _SET_FOR_THE_RUN:
        os.environ.pop(_SET_FOR_THE_RUN.pop(), None)


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


MIGRATED = ".pacs2bids-migrated"  # in PREFECT_HOME: the Prefect version that last migrated its database


def _migrated_marker() -> Path | None:
    """Where a run records that Prefect's own SQLite database (in PREFECT_HOME) is migrated;
    None when Prefect is not in ephemeral mode with that database (an API URL or another
    database is set, in the environment or in Prefect's profiles: the migrations stay as they are)."""
    if any(os.environ.get(v) for v in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL",
                                       "PREFECT_SERVER_DATABASE_CONNECTION_URL")):
        return None
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        profiles = (home / "profiles.toml").read_text()
    except OSError:
        profiles = ""
    if "API_URL" in profiles or "DATABASE" in profiles or not (home / "prefect.db").is_file():
        return None
    return home / MIGRATED


def _record_migrated() -> None:
    """After a run that reached Prefect's API: its database is migrated by this Prefect version."""
    marker = _migrated_marker()
    if marker is not None and os.environ.get("PREFECT_API_DATABASE_MIGRATE_ON_START") != "false":
        marker.write_text(_prefect_version() + "\n")


def run_spec(spec_path: Path, *, as_json: bool = False, replicate: bool = False, late_days: int | None = None) -> int:
    """Validate the spec, run the flow (``replicate``: ``replicate_project``, else ``extract_project``),
    print the summary; returns the exit code."""
    skips_migrations = _prefect_defaults()
    try:
        return _run(spec_path, as_json, replicate, late_days)
    finally:
        if skips_migrations:  # for this run only: another PREFECT_HOME in this process may be new
            _unset_repeat_start()


def _run(spec_path: Path, as_json: bool, replicate: bool, late_days: int | None) -> int:
    # Prefect's server for this run starts first (its start-up is the longest of a run's fixed costs, issue 12):
    # before the spec is read (pydantic) and while the flow's modules import; a bad spec stops it unused
    server = prefectserver.start()
    try:
        from .config import load_spec

        load_spec(spec_path)  # refuse a bad spec before Prefect or the PACS is touched
        from pacs2bids.flows.extract import RunFailed, extract_project

        from .progressview import show_progress

        before_the_server()
    except BaseException as exc:  # a bad spec (or an interrupt) before the run: its server stops unused
        if server is not None:
            server.stop()
            os.environ.pop("PREFECT_API_URL", None)  # set by start(): there was none before
        if not isinstance(exc, SpecError):
            raise
        print(f"pacs2bids: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with prefectserver.serving(server), show_progress(sys.stderr):  # a bar on a terminal, lines otherwise
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
    _record_migrated()  # the flow ran: Prefect's API (and its database) answered
    print()
    print(json.dumps(summary, indent=2) if as_json else _format(summary))
    return {"completed": EXIT_OK, "completed with failures": EXIT_PARTIAL}.get(summary["state"], EXIT_FAILED)


#: What Prefect imports only at a run's first flow and task calls, once its server answered (its engines,
#: FastAPI's JSON encoder for the flow's parameters, rich's emoji table for the first log line: about 130
#: modules, Prefect 3.8): imported by :func:`before_the_server` instead, while the server starts.
PREIMPORT = ("prefect.flow_engine", "prefect.task_engine", "prefect.utilities.visualization", "fastapi.encoders",
             "rich._emoji_codes")


def before_the_server() -> None:
    """What the run's process would do on its critical path once the server answers, done while the server
    still starts (issue 12: the server's start-up is the longest of the run's fixed costs, the flow's imports
    end before it): the tools' versions (asked once per process: dcm2niix run, packages read), and the modules
    Prefect imports at a run's first flow and task calls (:data:`PREIMPORT`)."""
    import importlib

    from .versions import tool_versions

    tool_versions()
    for name in PREIMPORT:
        try:
            importlib.import_module(name)
        except ImportError:  # another Prefect or rich version: it imports what it needs when it needs it
            pass


def end_process(code: int) -> NoReturn:
    """End the command's process with ``code`` as the interpreter would, less its finalisation: the
    non-daemon threads are waited for and the executors stopped (``threading``'s shutdown), the
    ``atexit`` handlers run (logging flushed and closed, Prefect's services drained, temporary folders
    removed), the standard streams flushed; then ``os._exit``, which skips freeing every module and
    object one by one (seconds after a run that imported Prefect, pydicom, pyarrow... issue 12).
    For the command line's own process only, never a library call (it ends the process)."""
    import atexit
    import threading

    threading._shutdown()  # what Py_Finalize does first (wait_for_thread_shutdown)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written there anyway
            pass
    os._exit(code)


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
