"""The ``pacs2bids`` command.

Exit codes: 0 completed; 1 failed, nothing published; 2 bad spec or usage; 3 completed with
failures (published, some series or studies listed as failed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import Pacs2BidsError, SpecError
from .launch import EXIT_FAILED, EXIT_OK, EXIT_USAGE, end_process, run_spec


def load_spec(path):
    """:func:`pacs2bids.config.load_spec`, imported when a command reads a spec: ``run`` starts Prefect's
    server before it imports the spec's models (pydantic, issue 12)."""
    from .config import load_spec as load

    return load(path)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from .logsafety import quiet_third_party_loggers

    quiet_third_party_loggers()  # no original identifier on stderr (dicomweb-client logs UIDs at INFO)


def _cmd_run(args) -> int:
    return run_spec(Path(args.spec), as_json=args.json)


def _cmd_replicate(args) -> int:
    return run_spec(Path(args.spec), as_json=args.json, replicate=True, late_days=args.late_days)


def _cmd_status(args) -> int:
    from .status import format_status, project_status, to_json

    import os

    specs = args.spec or [s for s in os.environ.get("PACS2BIDS_SPECS", "").split(os.pathsep) if s]
    if not specs:
        print("pacs2bids status: give the projects' spec files (or list them in PACS2BIDS_SPECS, separated by "
              f"'{os.pathsep}')", file=sys.stderr)
        return EXIT_USAGE
    statuses = [project_status(load_spec(s)) for s in specs]
    print(to_json(statuses) if args.json else "\n\n".join(format_status(s) for s in statuses))
    return EXIT_OK


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output), transport=args.transport, retrieve=args.retrieve)


def _cmd_lineage(args) -> int:
    from .lineage import format_chain, format_instances, instance_counts, instances_of, lineage_of, prov_story

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
    _, story = prov_story(path)
    if rows or not story:
        print(format_chain(root, path, rows, instance_counts(root) if rows else None))
    if story:
        print(story)
    return EXIT_OK if rows or story else EXIT_FAILED


def _cmd_reintegrate(args) -> int:
    from .reintegrate import Producer, reintegrate

    spec = load_spec(Path(args.spec))
    producer = Producer.from_file(Path(args.producer_file)) if args.producer_file else Producer(
        args.producer or "", args.tool or "", args.tool_version or "", args.method or "")
    done = reintegrate(spec, Path(args.folder), producer, name=args.name)
    print(f"derivatives/{done.name}: {done.files} file(s) of {len(done.subjects)} subject(s) published "
          f"in version {done.version.name}")
    failed = [t for t in done.targets if getattr(t, "state", "") == "failed"]
    return 3 if failed else EXIT_OK


def _cmd_check(args) -> int:
    from .check import preflight

    spec = load_spec(args.spec)
    results = preflight(spec)
    for r in results:
        tag = {"ok": "ok", "failed": "FAIL"}.get(r.status, r.status)
        print(f"[{tag}] {r.name}: {r.detail}" + (f"\n       fix: {r.fix}" if r.failed and r.fix else ""))
    failed = [r.name for r in results if r.failed]
    untested = [r.name for r in results if r.status not in ("ok", "failed")]
    if failed:
        print(f"check: {len(failed)} failed ({', '.join(failed)})", file=sys.stderr)
    elif untested:
        print(f"check: passed, but not tested: {', '.join(untested)}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_plan(args) -> int:
    from .pacs import close_pools
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
    from .deid.reidentify import AuditRefused

    spec = load_spec(args.spec)
    store = KeyStore(spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes)
    try:
        answer = store.reidentify(args.subject.removeprefix("sub-"), reason=args.reason)
    except AuditRefused as exc:
        print(f"pacs2bids: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyError:
        print(f"pacs2bids: no subject {args.subject} in the matching key of {spec.project} "
              "(the attempt is recorded in the audit log)", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(answer, indent=2))
    return EXIT_OK


def _print_audit_log(spec) -> bool:
    """Print the re-identification audit log and verify its chain; whether it is intact."""
    from .deid import KeyStore

    store = KeyStore(spec.resolved_key_store, project=spec.project, secret=spec.secret_bytes)
    legacy = store.legacy_audit_log() if (spec.resolved_key_store / "audit.fernet").exists() else []
    for r in legacy:
        print(f"   -  {r.get('when')}  {r.get('who')}  {r.get('what')}  sub-{r.get('subject')}  "
              f"reason: {r.get('reason')!r}  (older version, not chained)")
    v, records = store.verify_audit()
    for e, r in zip(v.entries, records):
        who = r.get("who", "?") + (f" (claimed {r['claimed_who']})" if r.get("claimed_who") else "")
        reason = repr(r["reason"]) if "reason" in r else "(not readable without the key: SHA-256 only)"
        mark = "ok" if e.signed else ("unsigned" if not e.problem else "BROKEN")
        print(f"{e.number:4d}  {r.get('when')}  {who}  {r.get('what')}  sub-{r.get('subject')}  reason: {reason}  "
              f"[{mark}]")
    if v.broken is not None:
        print(f"pacs2bids audit: the audit log {spec.resolved_key_store / 'audit.jsonl'} is BROKEN at entry "
              f"{v.broken.number}, which {v.broken.problem}", file=sys.stderr)
        return False
    print(f"audit log intact: {len(v.entries)} entr{'y' if len(v.entries) == 1 else 'ies'}, head {v.head} "
          "(note the head elsewhere: entries cut off at the end are found only by comparing it)")
    return True


def _verify_quarantine_log(spec) -> bool:
    """Verify the quarantine's decisions, the other signed log of the project; whether they are intact."""
    from .quarantine import Quarantine

    q = Quarantine.for_spec(spec)
    qv = q.verification()
    if qv.broken is not None:
        print(f"pacs2bids audit: {q.problems()[0]}", file=sys.stderr)
        return False
    if qv.entries:
        print(f"quarantine decisions intact: {len(qv.entries)} entr{'y' if len(qv.entries) == 1 else 'ies'}, "
              f"head {qv.head}")
    return True


def _cmd_audit(args) -> int:
    from . import audit

    if args.spec is None:  # every project's operations log in $PACS2BIDS_AUDIT_DIR, hash chain only
        return EXIT_OK if audit.print_site_report(sys.stdout, sys.stderr) else EXIT_FAILED
    spec = load_spec(args.spec)
    audit_intact = _print_audit_log(spec)
    quarantine_intact = _verify_quarantine_log(spec)  # checked even when the audit log is broken
    operations_intact = audit.print_report(spec, sys.stdout, sys.stderr, merged=args.timeline)
    return EXIT_OK if audit_intact and quarantine_intact and operations_intact else EXIT_FAILED


def _cmd_purge(args) -> int:
    from .purge import format_plan, plan_purge

    spec = load_spec(args.spec)
    if args.dry_run:  # no Prefect needed to list
        print(format_plan(plan_purge(spec), dry_run=True))
        return EXIT_OK
    from pacs2bids.flows.purge import purge_project

    from .launch import _prefect_defaults

    _prefect_defaults()
    result = purge_project(str(Path(args.spec)))
    print(result["text"])
    return EXIT_OK if not result["errors"] else EXIT_FAILED


def _cmd_quarantine(args) -> int:
    from .quarantine import Quarantine

    spec = load_spec(args.spec)
    q = Quarantine.for_spec(spec)
    if args.action == "list":
        for problem in q.problems():
            print(f"warning: {problem}", file=sys.stderr)
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


def _add_extraction_commands(sub) -> None:
    p = sub.add_parser("run", help="extract a project: query, retrieve, pseudonymise, convert, validate, publish")
    p.add_argument("spec", help="project spec (YAML)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("replicate", help="bring a project up to date: only studies newer than its watermark, "
                       "and late series of recent ones (docs: Incremental replication)")
    p.add_argument("spec", help="project spec (YAML)")
    p.add_argument("--late-days", type=int, default=None, help="re-check this many days before the watermark "
                   "(default: the spec's replication.late_days, 7)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_replicate)

    p = sub.add_parser("status", help="per project: versions published, from which PACS, last run, pending, "
                       "failing, awaiting review (local state only)")
    p.add_argument("spec", nargs="*", help="project specs (default: those PACS2BIDS_SPECS lists)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("demo", help="extract the bundled sample from a bundled Orthanc into a local BIDS dataset")
    p.add_argument("--output", default="pacs2bids-demo", help="where the dataset appears (default: ./pacs2bids-demo)")
    p.add_argument("--transport", choices=["dimse", "dicomweb"], default="dimse")
    p.add_argument("--retrieve", choices=["c-get", "c-move"], default="c-get")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("lineage", help="where a dataset file came from")
    p.add_argument("path")
    p.set_defaults(func=_cmd_lineage)

    p = sub.add_parser("reintegrate", help="bring a researcher's BIDS derivative dataset back into the project dataset")
    p.add_argument("spec")
    p.add_argument("folder", help="the derivative dataset (dataset_description.json with DatasetType derivative)")
    p.add_argument("--producer", help="the person or team who made it")
    p.add_argument("--tool", help="the tool that made it")
    p.add_argument("--tool-version", help="that tool's version")
    p.add_argument("--method", help="how the results were made, in a sentence")
    p.add_argument("--producer-file", help="a JSON file with name, tool, tool_version, method (instead)")
    p.add_argument("--name", help="folder name under derivatives/ (default: the dataset's Name)")
    p.set_defaults(func=_cmd_reintegrate)

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


def _add_review_commands(sub) -> None:
    p = sub.add_parser("reidentify", help="authorised lookup of a subject's original identity (audited)")
    p.add_argument("spec")
    p.add_argument("subject")
    p.add_argument("--reason", required=True, help="why (recorded in the audit log; at least 10 characters)")
    p.set_defaults(func=_cmd_reidentify)

    p = sub.add_parser("audit", help="print the audit logs (operations, re-identification, quarantine decisions) "
                                     "in time order and verify their chains (exit 1 if one is broken)")
    p.add_argument("spec", nargs="?", help="project spec; without it, every log in $PACS2BIDS_AUDIT_DIR (chain only)")
    p.add_argument("--timeline", action="store_true", help="also every entry of the three logs merged in time order")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("quarantine", help="list quarantined files; release or reject one after review")
    p.add_argument("action", choices=["list", "release", "reject"])
    p.add_argument("spec")
    p.add_argument("item", nargs="?", help="item id (from 'list')")
    p.add_argument("--reviewer", help="who decides (recorded with the decision)")
    p.add_argument("--note", default="", help="why (recorded with the decision)")
    p.add_argument("--replace", help="release: a cleaned copy of the same image to publish instead")
    p.set_defaults(func=_cmd_quarantine)

    p = sub.add_parser("purge", help="delete expired versions (retention in the spec) everywhere; after the "
                                     "project's end also the work area, quarantine and matching key (audited)")
    p.add_argument("spec")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.set_defaults(func=_cmd_purge)

    p = sub.add_parser("dead-letter", help="series and studies that keep failing, with their last error")
    p.add_argument("spec")
    p.set_defaults(func=_cmd_dead_letter)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs2bids", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_extraction_commands(sub)
    _add_review_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        code = args.func(args)
    except SpecError as exc:
        print(f"pacs2bids: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except Pacs2BidsError as exc:
        print(f"pacs2bids: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    if argv is None and args.command in ("run", "replicate", "demo") and "pytest" not in sys.modules:
        end_process(code)  # the command's own process, its run returned: no interpreter finalisation (issue 12)
    return code


if __name__ == "__main__":
    sys.exit(main())
