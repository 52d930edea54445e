"""Offline store commands: `savepoint init`, `inspect` and `history TARGET` (store not served)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from appliance.preflight import Refused, check_target, explain_os_error, removed_on_failure
from appliance.sizes import human
from appliance.store.format import FORMAT_VERSION, Geometry


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
    p.add_argument(
        "--size",
        type=parse_size,
        help="host-visible disk size (e.g. 8G); "
        "on a block device the default is the largest that fits",
    )
    p.add_argument("--unit", type=parse_size, default=4096, help="unit size (default 4K)")
    p.add_argument("--force", action="store_true", help="overwrite whatever the target holds")
    p.add_argument(
        "--allow-overcommit",
        action="store_true",
        help="create a store file larger than the free space of its file system "
        "(sparse: writes fail with 'no space left' when it fills)",
    )
    p.add_argument(
        "--from",
        dest="image",
        metavar="IMAGE",
        help="make this disk image (raw, "
        "qcow2, or any format qemu-img reads) the saved state; --size defaults to "
        "its size",
    )
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("export", help="write the saved (or working) state to a disk image")
    p.add_argument("target", help="the store (served or not)")
    p.add_argument("out", help="the image file to write")
    view = p.add_mutually_exclusive_group()
    view.add_argument(
        "--saved", dest="working", action="store_false", help="the last saved state (default)"
    )
    view.add_argument(
        "--working", action="store_true", help="what the disk holds now, unsaved writes included"
    )
    p.add_argument("--format", "-O", default="raw", help="image format: raw (default), qcow2...")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--control", help="the daemon's control socket, when the store is served")
    p.set_defaults(func=cmd_export, working=False)
    p = sub.add_parser("inspect", help="show a store's format, geometry, epoch and history")
    p.add_argument("target")
    p.add_argument("--check", action="store_true", help="verify every checksum and invariant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def cmd_init(args: argparse.Namespace) -> int:
    from appliance.store import StoreError
    from appliance.store.images import ImageError
    from appliance.store.init import InitError

    try:
        if args.image:
            geo = init_from_image(args)
        else:
            geo = create_checked(
                args.target,
                args.size,
                args.unit,
                args.force,
                allow_overcommit=args.allow_overcommit,
            )
    except (InitError, StoreError, ValueError, Refused, ImageError) as e:
        print(f"savepoint init: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"savepoint init: {explain_os_error(e, args.target)}", file=sys.stderr)
        return 1
    print(
        f"created a Savepoint store on {args.target}: disk {human(geo.logical_size)} "
        f"({geo.unit_count} units of {human(geo.unit_size)}); it uses up to "
        f"{human(geo.total_size)} (2 x disk + {human(geo.slot_off[0])} metadata)"
        + (f"; {args.image} is its saved state (epoch 1 in history)" if args.image else "")
    )
    _print_space(args.target)
    return 0


def _print_space(target: str) -> None:
    """For a store file: what it takes now and what its file system has left."""
    from appliance.store.filesystem import allocated, fs_free

    if not os.path.isfile(target):
        return
    fd = os.open(target, os.O_RDONLY)
    try:
        used, free = allocated(fd), fs_free(fd)
    finally:
        os.close(fd)
    print(
        f"  sparse file: {human(used)} allocated now (metadata), {human(free)} free on its "
        "file system"
    )


def init_from_image(args: argparse.Namespace) -> Geometry:
    from appliance.store import Store
    from appliance.store.images import ImageError, image_info, import_image

    fmt, virtual = image_info(args.image)
    size = args.size or -(-virtual // 512) * 512
    if size < virtual:
        raise ImageError(
            f"{args.image} holds {human(virtual)}, more than --size "
            f"{human(size)}: leave --size out to use the image's size"
        )
    if os.path.abspath(args.image) == os.path.abspath(args.target):
        raise ImageError("the image and the target are the same file: give a new target")
    with removed_on_failure(args.target):
        geo = create_checked(
            args.target, size, args.unit, args.force, allow_overcommit=args.allow_overcommit
        )
        with Store.open(args.target) as st:
            import_image(st, args.image, fmt, progress=sys.stderr.isatty())
    return geo


def cmd_export(args: argparse.Namespace) -> int:
    from appliance.progress import Progress
    from appliance.store import StoreError
    from appliance.store.images import ImageError, export_offline, is_served

    if os.path.exists(args.out) and not args.force:
        print(
            f"savepoint export: {args.out} exists; nothing was changed: add --force to "
            "overwrite it",
            file=sys.stderr,
        )
        return 1
    view = "working" if args.working else "saved"
    written: int | None
    try:
        if is_served(args.target):
            export_through_daemon(args)
            written = None  # qemu-img wrote it: its allocation is not counted
        else:
            with removed_on_failure(args.out), Progress(f"exporting the {view} state") as bar:
                written = export_offline(
                    args.target, args.out, not args.working, args.format, bar.update
                )
    except (StoreError, ImageError) as e:
        print(f"savepoint export: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"savepoint export: {explain_os_error(e)}", file=sys.stderr)
        return 1
    data = f" ({human(written)} allocated, the rest sparse)" if written is not None else ""
    print(f"exported the {view} state of {args.target} to {args.out}{data}")
    return 0


def export_through_daemon(args: argparse.Namespace) -> None:
    """A served store: read its NBD export, after checking it is this store."""
    import uuid

    from appliance.control.client import ControlClient, ControlError
    from appliance.store.format import SB_SIZE, superblock_copies
    from appliance.store.images import ImageError, export_served

    with open(args.target, "rb") as f:
        uuids = {
            str(uuid.UUID(bytes=sb.uuid))
            for sb in superblock_copies(f.read(2 * SB_SIZE))
            if not isinstance(sb, Exception)
        }
    try:
        from appliance.cli_talk import control_path

        with ControlClient(control_path(args), timeout=60) as client:
            st = client.request("status").get("data") or {}
    except ControlError as e:
        raise ImageError(
            f"{args.target} is in use by a daemon, but: {e} (give --control)"
        ) from None
    if str(st.get("uuid")) not in uuids or not st.get("nbd_uris"):
        raise ImageError(
            f"{args.target} is served by a daemon other than the one at the "
            "control socket, or without NBD: give its --control"
        )
    if not args.working and st.get("dirty_units"):
        raise ImageError(
            f"{args.target} is served and has {st['dirty_units']} unsaved units: "
            "the daemon exports only the working state. Use --working, or SAVE "
            "(or stop the daemon) first"
        )
    with removed_on_failure(args.out):
        export_served(st["nbd_uris"][0], args.out, args.format)


def create_checked(
    target: str,
    size: int | None,
    unit: int,
    force: bool = False,
    label: str = "zeroing metadata",
    allow_overcommit: bool = False,
) -> Geometry:
    """create_store after every check that needs no writing; a failure leaves no new file."""
    from appliance.progress import Progress
    from appliance.store import create_store
    from appliance.store.format import plan_geometry

    if size is not None:
        check_target(target, plan_geometry(size, unit).total_size, size)
    with removed_on_failure(target), Progress(label) as bar:
        return create_store(
            target, size, unit, force, progress=bar.update, allow_overcommit=allow_overcommit
        )


def cmd_inspect(args: argparse.Namespace) -> int:
    from appliance.store import Store, StoreError
    from appliance.store.check import check_store

    try:
        with Store.open(args.target, readonly=True) as st:
            info: dict[str, Any] = {
                "format_version": FORMAT_VERSION,
                "geometry": st.geo.__dict__,
                "status": st.status(),
                "history": st.history(limit=10),
            }
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
    print(
        f"  epoch       {s['epoch']}  (written since last command: {s['dirty_units']} units, "
        f"{human(s['dirty_bytes'])})"
    )
    print(f"  background  {s['pending_units']} units waiting")
    print(
        f"  regions     history @{g['hist_off']}, map @{g['meta_off']} ({g['meta_len']} B), "
        f"slots @{g['slot_off'][0]} and @{g['slot_off'][1]}"
    )
    space = s.get("space") or {}
    if "fs_free_bytes" in space:
        print(
            f"  space       {human(space['allocated_bytes'])} allocated of up to "
            f"{human(space['full_size'])}; {human(space['fs_free_bytes'])} free on its file "
            f"system (margin {human(space['margin_bytes'])})"
        )
    print_history(info["history"])
    if "check" in info:
        _print_check(info["check"])


def _print_check(c: dict) -> None:
    for note in c["notes"]:
        print(f"  check: {note}")
    for problem in c["problems"]:
        print(f"  PROBLEM: {problem}")
    print("check: OK" if c["ok"] else f"check: {len(c['problems'])} problem(s) found")


def print_history(records: list[dict], events: list[dict] | None = None) -> None:
    """SAVE/RESTORE records and the parts' events (fob pairings...), interleaved by time."""
    if not records:
        print("  (no SAVE or RESTORE yet)")
    rows = sorted([*records, *(events or [])], key=lambda r: float(r.get("time", 0)))
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
        if "epoch" not in r:  # a part's event: who and what, no units
            print(f"  {r.get('part', ''):<12}  {when}  {r['action']:<7}  {r['source']:<16} "
                  f"{r.get('detail', '')}".rstrip())  # fmt: skip
            continue
        print(
            f"  epoch {r['epoch']:>6}  {when}  {r['action']:<7}  {r['source']:<16} "
            f"{r['units']:>8} units  {human(r['bytes']):>10}  {host_column(r)}".rstrip()
        )


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
        why = explain_os_error(e, target) if isinstance(e, OSError) else e
        print(f"savepoint history: {why}", file=sys.stderr)
        return 1
    return 0
