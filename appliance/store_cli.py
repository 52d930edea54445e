"""Offline store commands: `savepoint init`, `inspect` and `history TARGET` (store not served)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from appliance.preflight import Refused, check_target, explain_os_error, removed_on_failure
from appliance.sizes import human
from appliance.store_format import FORMAT_VERSION


def parse_size(text: str) -> int:
    """The CLI's size argument (appliance.sizes: K/M/G/T binary, KB/GB refused, > 0)."""
    from appliance.sizes import parse_size as parse

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_store_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a store on a file or block device")
    p.add_argument("target")
    p.add_argument("--size", type=parse_size, help="host-visible disk size (e.g. 8G); "
                   "on a block device the default is the largest that fits")
    p.add_argument("--unit", type=parse_size, default=4096, help="unit size (default 4K)")
    p.add_argument("--force", action="store_true", help="overwrite whatever the target holds")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("inspect", help="show a store's format, geometry, epoch and history")
    p.add_argument("target")
    p.add_argument("--check", action="store_true", help="verify every checksum and invariant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def cmd_init(args: argparse.Namespace) -> int:
    from appliance.store import StoreError
    from appliance.store_init import InitError

    try:
        geo = create_checked(args.target, args.size, args.unit, args.force)
    except (InitError, StoreError, ValueError, Refused) as e:
        print(f"savepoint init: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"savepoint init: {explain_os_error(e, args.target)}", file=sys.stderr)
        return 1
    print(f"created a Savepoint store on {args.target}: disk {human(geo.logical_size)} "
          f"({geo.unit_count} units of {human(geo.unit_size)}); it uses "
          f"{human(geo.total_size)} (2 x disk + {human(geo.slot_off[0])} metadata)")
    return 0


def create_checked(target: str, size: int | None, unit: int, force: bool = False,
                   label: str = "zeroing metadata"):
    """create_store after every check that needs no writing; a failure leaves no new file."""
    from appliance.progress import Progress
    from appliance.store import create_store
    from appliance.store_format import plan_geometry

    if size is not None:
        check_target(target, plan_geometry(size, unit).total_size, size)
    with removed_on_failure(target), Progress(label) as bar:
        return create_store(target, size, unit, force, progress=bar.update)


def cmd_inspect(args: argparse.Namespace) -> int:
    from appliance.store import Store, StoreError
    from appliance.store_check import check_store

    try:
        with Store.open(args.target, readonly=True) as st:
            info = {"format_version": FORMAT_VERSION, "geometry": st.geo.__dict__,
                    "status": st.status(), "history": st.history(limit=10)}
    except (StoreError, OSError) as e:
        why = explain_os_error(e, args.target) if isinstance(e, OSError) else e
        print(f"savepoint inspect: {why}", file=sys.stderr)
        if not args.check or isinstance(e, OSError):
            return 1
        info = {}  # unreadable as a store: the check still says what it found
    report = None
    if args.check:
        from appliance.progress import Progress

        with Progress("checking the map") as bar:
            report = check_store(args.target, progress=bar.update)
    if report is not None:
        info["check"] = {"ok": report.ok, "problems": report.problems, "notes": report.notes}
    if args.json:
        print(json.dumps(info, indent=2, default=list))
    elif "geometry" in info:
        _print_inspect(info)
    else:
        _print_check(info["check"])
    return 0 if report is None or report.ok else 2


def _print_inspect(info: dict) -> None:
    g, s = info["geometry"], info["status"]
    print(f"Savepoint store, format version {info['format_version']}, uuid {s['uuid']}")
    print(f"  disk size   {human(g['logical_size'])} ({g['logical_size']} bytes)")
    print(f"  units       {g['unit_count']} x {human(g['unit_size'])}")
    print(f"  epoch       {s['epoch']}  (written since last command: {s['dirty_units']} units, "
          f"{human(s['dirty_bytes'])})")
    print(f"  background  {s['pending_units']} units waiting")
    print(f"  regions     history @{g['hist_off']}, map @{g['meta_off']} ({g['meta_len']} B), "
          f"slots @{g['slot_off'][0]} and @{g['slot_off'][1]}")
    print_history(info["history"])
    if "check" in info:
        _print_check(info["check"])


def _print_check(c: dict) -> None:
    for note in c["notes"]:
        print(f"  check: {note}")
    for problem in c["problems"]:
        print(f"  PROBLEM: {problem}")
    print("check: OK" if c["ok"] else f"check: {len(c['problems'])} problem(s) found")


def print_history(records: list[dict]) -> None:
    if not records:
        print("  (no SAVE or RESTORE yet)")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
        print(f"  epoch {r['epoch']:>6}  {when}  {r['action']:<7}  {r['source']:<16} "
              f"{r['units']:>8} units  {human(r['bytes']):>10}")


def history_offline(target: str, as_json: bool, limit: int | None) -> int:
    """`savepoint history TARGET`: read the history of a store that is not being served."""
    from appliance.store import Store, StoreError

    try:
        with Store.open(target, readonly=True) as st:
            records = st.history(limit)
        if as_json:  # the daemon's reply shape, so one parser reads both
            print(json.dumps({"ok": True, "reason": "", "data": {"history": records}}, indent=2))
        else:
            print_history(records)
    except (StoreError, OSError) as e:
        why = explain_os_error(e, target) if isinstance(e, OSError) else e
        print(f"savepoint history: {why}", file=sys.stderr)
        return 1
    return 0
