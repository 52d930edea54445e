"""Offline store commands: `savepoint init`, `inspect` and `history TARGET` (store not served)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from appliance.store_format import FORMAT_VERSION


def parse_size(text: str) -> int:
    """The CLI's size argument: '1G', '512M', '4K' (appliance.config.parse_size)."""
    from appliance.config import parse_size as parse

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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
    from appliance.store import StoreError, create_store
    from appliance.store_init import InitError

    def progress(done: int, total: int) -> None:
        print(f"\rzeroing metadata: {min(done, total) * 100 // total}%", end="", file=sys.stderr)

    try:
        geo = create_store(args.target, args.size, args.unit, args.force, progress=progress)
    except (InitError, StoreError, ValueError, OSError) as e:
        print(f"savepoint init: {e}", file=sys.stderr)
        return 1
    print(f"created a Savepoint store on {args.target}: disk {human(geo.logical_size)} "
          f"({geo.unit_count} units of {human(geo.unit_size)}); it uses "
          f"{human(geo.total_size)} (2 x disk + {human(geo.slot_off[0])} metadata)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from appliance.store import Store, StoreError
    from appliance.store_check import check_store

    try:
        with Store.open(args.target, readonly=True) as st:
            info = {"format_version": FORMAT_VERSION, "geometry": st.geo.__dict__,
                    "status": st.status(), "history": st.history(limit=10)}
    except (StoreError, OSError) as e:
        print(f"savepoint inspect: {e}", file=sys.stderr)
        if not args.check or isinstance(e, OSError):
            return 1
        info = {}  # unreadable as a store: the check still says what it found
    report = check_store(args.target) if args.check else None
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
              f"{r['units']:>8} units  {human(r['bytes']):>10}  {host_column(r)}".rstrip())


def host_column(r: dict) -> str:
    """What a SAVE knew of the host (docs/controls.md, "Saving while the disk is mounted")."""
    if r.get("action") != "save":
        return ""
    synced = "synced" if r.get("host_synced") else "not synced"
    if r.get("quiet") is None:  # a record written before the quiet time was kept
        return f"host {synced}"
    quiet = r["quiet"]
    text = f"host quiet {'>6553' if quiet >= 6553.5 else f'{quiet:.1f}'} s, {synced}"
    if r.get("host_busy"):
        text += ", BUSY (saved anyway)"
    elif r.get("forced"):
        text += ", forced"
    return text


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
        print(f"savepoint history: {e}", file=sys.stderr)
        return 1
    return 0
