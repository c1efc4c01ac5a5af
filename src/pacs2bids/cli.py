"""The ``pacs2bids`` command.

Exit codes: 0 completed; 1 failed, nothing published; 2 bad spec or usage; 3 completed with
failures (published, some series or studies listed as failed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import load_spec
from .errors import Pacs2BidsError, SpecError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("pynetdicom", "nipype", "heudiconv", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _prefect_defaults() -> None:
    """Settings for Prefect's ephemeral mode on a small machine with no outside network:
    a first start migrates a new database and can take longer than Prefect's default wait."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    os.environ.setdefault("NO_ET", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def run_spec(spec_path: Path, *, as_json: bool = False) -> int:
    """Validate the spec, run the flow, print the summary; returns the exit code."""
    _prefect_defaults()
    try:
        load_spec(spec_path)  # refuse a bad spec before Prefect or the PACS is touched
    except SpecError as exc:
        print(f"pacs2bids: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from pacs2bids.flows.extract import RunFailed, extract_project
    from .run import RunSummary

    try:
        summary = extract_project(str(spec_path))
    except RunFailed as exc:
        summary = exc.summary
    except Pacs2BidsError as exc:
        print(f"pacs2bids: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print()
    print(json.dumps(summary, indent=2) if as_json else _format(summary))
    return {"completed": EXIT_OK, "completed with failures": EXIT_PARTIAL}.get(summary["state"], EXIT_FAILED)


def _format(summary: dict) -> str:
    from .run import RunSummary, SeriesLine

    s = RunSummary(project=summary["project"], run_id=summary["run_id"], output=summary["output"])
    for k in ("state", "studies", "already_published", "unmatched", "study_failures", "quarantined", "released", "awaiting_review", "dead_letter", "validator_warnings", "errors", "published"):
        setattr(s, k, summary[k])
    s.subjects = set(summary["subjects"])
    s.series = [SeriesLine(**line) for line in summary["series"]]
    return s.format()


def _cmd_run(args) -> int:
    return run_spec(Path(args.spec), as_json=args.json)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output), transport=args.transport, retrieve=args.retrieve)


def _cmd_lineage(args) -> int:
    from .lineage import format_chain, format_instances, instance_counts, instances_of, lineage_of

    path = Path(args.path)
    try:
        root, rows = lineage_of(path)
        _, instances = instances_of(path)
    except FileNotFoundError as exc:
        print(f"pacs2bids: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if instances and not rows:  # a pseudonymised DICOM file or folder under sourcedata/
        print(format_instances(root, path, instances))
        return EXIT_OK
    print(format_chain(root, path, rows, instance_counts(root) if rows else None))
    return EXIT_OK if rows else EXIT_FAILED


def _cmd_check(args) -> int:
    from .check import preflight

    spec = load_spec(args.spec)
    results = preflight(spec)
    for r in results:
        print(f"[{'ok' if r.ok else 'FAIL'}] {r.name}: {r.detail}" + ("" if r.ok or not r.fix else f"\n       fix: {r.fix}"))
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def _cmd_plan(args) -> int:
    from .dimse import close_pools
    from .plan import plan_project

    spec = load_spec(args.spec)
    try:
        plan = plan_project(spec)
    finally:
        close_pools()
    print("\n".join(plan.lines()) or "no study matched")
    return EXIT_OK


def _cmd_deid(args) -> int:
    from .dryrun import dry_run_project

    if not args.dry_run:
        print("pacs2bids deid: only --dry-run is available; 'pacs2bids run' pseudonymises", file=sys.stderr)
        return EXIT_USAGE
    spec = load_spec(args.spec)
    print(dry_run_project(spec, sample=args.sample))
    return EXIT_OK


def _cmd_reidentify(args) -> int:
    from .deid import KeyStore

    spec = load_spec(args.spec)
    store = KeyStore(spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes)
    try:
        answer = store.reidentify(args.subject.removeprefix("sub-"), reason=args.reason)
    except KeyError:
        print(f"pacs2bids: no subject {args.subject} in the matching key of {spec.project} "
              "(the attempt is recorded in the audit log)", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(answer, indent=2))
    return EXIT_OK


def _cmd_quarantine(args) -> int:
    from .quarantine import Quarantine

    spec = load_spec(args.spec)
    q = Quarantine(spec.resolved_work_dir / "quarantine")
    if args.action == "list":
        items = q.items()
        if not items:
            print(f"nothing in quarantine for {spec.project}")
        for i in items:
            where = f"sub-{i.subject}" + (f"_ses-{i.session}" if i.session else "") if i.subject else "(at retrieval)"
            print(f"{i.id}  {i.state:<9} {i.stage:<12} {where:<20} {i.reason}")
            if i.state == "pending" and q.path(i).exists():
                print(f"    file to review: {q.path(i)}")
        return EXIT_OK
    if not args.item or not args.reviewer:
        print(f"pacs2bids quarantine {args.action}: give the item id and --reviewer", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "release":
        item = q.release(args.item, reviewer=args.reviewer, note=args.note,
                         replacement=Path(args.replace) if args.replace else None)
        print(f"{item.id} released: the next 'pacs2bids run' publishes it (pseudonymised, pixels as reviewed)")
    else:
        item = q.reject(args.item, reviewer=args.reviewer, note=args.note)
        print(f"{item.id} rejected: its clinical copy is deleted and it will never be published")
    return EXIT_OK


def _cmd_dead_letter(args) -> int:
    from .deadletter import DeadLetters, format_entries

    spec = load_spec(args.spec)
    entries = DeadLetters(spec.resolved_work_dir / "dead-letter.json").entries()
    print(format_entries(entries))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacs2bids", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="extract a project: query, retrieve, pseudonymise, convert, validate, publish")
    p.add_argument("spec", help="project spec (YAML)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="extract the bundled sample from a bundled Orthanc into a local BIDS dataset")
    p.add_argument("--output", default="pacs2bids-demo", help="where the dataset appears (default: ./pacs2bids-demo)")
    p.add_argument("--transport", choices=["dimse", "dicomweb"], default="dimse")
    p.add_argument("--retrieve", choices=["c-get", "c-move"], default="c-get")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("lineage", help="where a dataset file came from")
    p.add_argument("path")
    p.set_defaults(func=_cmd_lineage)

    p = sub.add_parser("check", help="preflight: C-ECHO, test query, C-MOVE destination, DICOMweb, disk space")
    p.add_argument("spec")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("plan", help="before publishing: the BIDS path, or the reason left out, of every matched series")
    p.add_argument("spec")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("deid", help="show what pseudonymisation would change, on a sample of the project's studies")
    p.add_argument("spec")
    p.add_argument("--dry-run", action="store_true", required=True)
    p.add_argument("--sample", type=int, default=3, help="studies to sample (default 3)")
    p.set_defaults(func=_cmd_deid)

    p = sub.add_parser("reidentify", help="authorised lookup of a subject's original identity (audited)")
    p.add_argument("spec")
    p.add_argument("subject")
    p.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    p.set_defaults(func=_cmd_reidentify)

    p = sub.add_parser("quarantine", help="list quarantined files; release or reject one after review")
    p.add_argument("action", choices=["list", "release", "reject"])
    p.add_argument("spec")
    p.add_argument("item", nargs="?", help="item id (from 'list')")
    p.add_argument("--reviewer", help="who decides (recorded with the decision)")
    p.add_argument("--note", default="", help="why (recorded with the decision)")
    p.add_argument("--replace", help="release: a cleaned copy of the same image to publish instead")
    p.set_defaults(func=_cmd_quarantine)

    p = sub.add_parser("dead-letter", help="series and studies that keep failing, with their last error")
    p.add_argument("spec")
    p.set_defaults(func=_cmd_dead_letter)

    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"pacs2bids: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Pacs2BidsError as exc:
        print(f"pacs2bids: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
