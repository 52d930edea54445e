"""What `savepoint` prints: the daemon's replies (status, SAVE/RESTORE outcomes, lock state)
and its events (`watch`), as lines a person reads."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from appliance.sizes import human


def describe_event(event: dict[str, Any]) -> str:
    kind, data = event.get("event"), event.get("data") or {}
    if kind == "outcome":
        verdict = "done" if data.get("ok") else f"refused: {data.get('reason')}"
        return f"{str(data.get('action')).upper()} from {data.get('source')}: {verdict}"
    if kind == "status":
        from appliance.cli_watch import describe_status

        return describe_status(data)
    if kind == "state":
        return (
            f"state: {data.get('mode')}, epoch {data.get('epoch')}, "
            f"{data.get('dirty_units')} unsaved units"
        )
    if kind == "progress":
        if data.get("phase") == "waiting":
            return (
                f"saving, waiting for the host (quiet for {data.get('settle')} s, at most "
                f"{data.get('max_wait')} s; press SAVE again or `savepoint save --now`)"
            )
        return f"{str(data.get('action')).upper()} {data.get('phase')}"
    if kind == "host":
        return "host connected" if data.get("connected") else "host disconnected"
    if kind == "pairing":
        if data.get("open"):
            return "pairing window open"
        return (
            f"pairing window closed ({data['why']})" if data.get("why") else "pairing window closed"
        )
    if kind == "fault":
        if data.get("cleared"):
            return f"part {data.get('part')} is up again"
        hint = f" ({data['hint']})" if data.get("hint") else ""
        return f"part {data.get('part')} failed: {data.get('reason')}{hint}"
    if kind == "warning":
        return f"warning: {data.get('name') or data.get('part')}: {data.get('reason')}"
    if kind == "buttons":
        return f"button {data.get('address')} ({data.get('name')}): {data.get('op')}"
    return f"{kind}: {json.dumps(data)}"


def show(command: str, data: dict[str, Any]) -> None:
    if command == "status":
        print_status(data)
    elif command == "history":
        from appliance.store.cli import print_history

        print_history(data.get("history", []), data.get("events"))
    elif command == "save" and data.get("hurried"):
        print("the waiting SAVE commits now")
    elif command in ("save", "restore"):
        print_outcome(command, data)
    elif command in ("unlock", "lock"):
        after, once = data.get("relock_after"), data.get("single_use")
        limits = ([f"for {after:g} s"] if after else []) + (["until one SAVE"] if once else [])
        extra = f" ({', '.join(limits)})" if limits else ""
        print(f"{data.get('mode', command).upper()}{extra}")
    elif command == "pair":
        print(
            f"pairing window open until {when(data.get('until'))}.\n"
            "On the fob (any computer with Bluetooth, or a Pi with a button), run now:\n"
            "  savepoint-fob pair\n"
            "It finds the appliance, pairs and stores its key; then `savepoint-fob save`, "
            "`restore`, `unlock` or `status` work from it. `savepoint fobs` lists paired fobs."
        )


def print_outcome(command: str, data: dict[str, Any]) -> None:
    """The epoch named is the one `history` lists for this record."""
    epoch, units = data.get("epoch", 0), data.get("units", 0)
    if not units:
        what = (
            "nothing to save: no writes since the last SAVE/RESTORE, the saved state is unchanged"
            if command == "save"
            else "nothing to discard: no writes since the last SAVE/RESTORE"
        )
    else:
        what = (
            f"{units} units ({human(data.get('bytes', 0))}) "
            f"{'kept' if command == 'save' else 'discarded'}"
        )
    print(f"{command.upper()} done: epoch {epoch}, {what}")
    clients = data.get("stale_clients")
    if clients:
        print(
            f"savepoint: {clients} NBD client{'s were' if clients != 1 else ' was'} connected "
            "during the RESTORE: their caches are now stale; stop or reconnect them before "
            "they read or write again",
            file=sys.stderr,
        )
    if command == "save" and data.get("quiet") is not None:
        from appliance.store.cli import host_column

        print(f"  {host_column(data)}; waited {data.get('waited', 0):.1f} s")


HOST_ROW: dict[object, str] = {True: "connected", False: "not connected"}


def print_status(st: dict[str, Any]) -> None:
    mode = str(st.get("mode", "?")).upper()
    if st.get("relock_in") is not None:
        mode += f" (re-locks in {int(st['relock_in'])} s)"
    elif not st.get("lock_enabled", True):
        mode += (
            " (SAVE refused until `savepoint unlock`; lock mode off: nothing re-locks)"
            if mode == "LOCKED"
            else " (lock mode off: SAVE needs no unlock)"
        )
    frac = float(st.get("unsaved_fraction", 0.0))
    bar = "#" * round(frac * 20) + "." * (20 - round(frac * 20))
    rows = [
        ("mode", mode),
        ("epoch", str(st.get("epoch"))),
        (
            "unsaved",
            f"{st.get('dirty_units', 0)} units, {human(st.get('dirty_bytes', 0))} "
            f"[{bar}] {frac:.1%} of {human(st.get('size', 0))}",
        ),
        (
            "background",
            "idle (map up to date)"
            if not st.get("pending_units")
            else f"{st.get('background_progress', 0):.0%} ({st['pending_units']} units waiting)",
        ),
        *_cache_rows(st),
        ("host", HOST_ROW.get(st.get("host_connected"), "unknown (no USB gadget)")),
        *_storage_rows(st),
        ("last SAVE", when(st.get("last_save"))),
        ("last RESTORE", when(st.get("last_restore"))),
    ]
    if st.get("saving"):
        rows.append(
            (
                "SAVE",
                f"saving, {st['saving']} (press SAVE again or `savepoint save "
                "--now` to commit now)",
            )
        )
    if st.get("pairing", {}).get("open"):
        rows.append(("pairing", f"open until {when(st['pairing'].get('until'))}"))
    for uri in st.get("nbd_uris", []):
        rows.append(("NBD", f"{uri} ({st.get('nbd_clients', 0)} clients)"))
    for name, part in (st.get("parts") or {}).items():
        if name == "storage":  # shown in the storage rows
            continue
        text = part["state"]
        if part["state"] == "failed":
            text += f": {part['reason']}" + (f" ({part['hint']})" if part.get("hint") else "")
        rows.append((f"part {name}", text))
    for b in (st.get("buttons") or {}).get("devices", []):
        battery = "?" if b.get("battery") is None else f"{b['battery']}%"
        warning = f", WARNING: {b['warning']}" if b.get("warning") else ""
        rows.append(
            (
                "button",
                f"{b['name']} {b['address']}: battery {battery}, last seen "
                f"{when(b.get('last_seen'))}{warning}",
            )
        )
    for label, value in rows:
        print(f"{label:<13}{value}")


def _storage_rows(st: dict[str, Any]) -> list[tuple[str, str]]:
    """Allocation, free space and margin of a store file; the "full" fault with what to do."""
    space = st.get("space") or {}
    rows = []
    if "fs_free_bytes" in space:
        margin = space["margin_bytes"]
        room = f"margin {human(margin)}" if margin >= 0 else f"OVER-COMMITTED by {human(-margin)}"
        rows.append(
            (
                "storage",
                f"{human(space['allocated_bytes'])} allocated of up to "
                f"{human(space['full_size'])}; {human(space['fs_free_bytes'])} "
                f"free on its file system ({room})",
            )
        )
    part = (st.get("parts") or {}).get("storage") or {}
    faults = [r for r in (space.get("full_reason"), space.get("punch_fault")) if r]
    if not faults and (space.get("full") or part.get("state") == "failed"):
        faults = [part.get("reason") or "backing storage full"]
    rows += [("FAULT", reason) for reason in faults]
    if faults and part.get("hint"):
        rows.append(("what to do", part["hint"]))
    return rows


def _cache_rows(st: dict[str, Any]) -> list[tuple[str, str]]:
    """The map cache: RAM in use against its budget ([store] map_cache) and its hit rate."""
    c = st.get("map_cache")
    if not c:
        return []
    return [
        (
            "map cache",
            f"{human(c['size'])} of {human(c['budget'])} budget, "
            f"{c['hit_rate']:.1%} hits, {c['evictions']} pages evicted",
        )
    ]


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "never"
