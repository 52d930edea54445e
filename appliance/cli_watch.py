"""`savepoint watch`: the daemon's events, plus what changes without one (unsaved data, the
background pass, NBD clients), polled at most once a second."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.control.client import ControlClient, ControlError
from appliance.sizes import human

WATCHED = ("dirty_units", "pending_units", "nbd_clients")  # what no event announces


def watch(client: ControlClient, as_json: bool, path: str, every: float = 1.0) -> int:
    # Ctrl-C ends watching even when started from a shell that ignores SIGINT (`watch &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    reply = client.request("watch")
    if not reply.get("ok"):
        from appliance.cli_talk import fail

        return fail(reply.get("reason") or "watch refused")
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event.get("event") == "outcome" and data.get("action") in ("status", "history"):
            return  # queries change nothing (and the poller's own would repeat every second)
        with lock:
            if as_json:
                print(json.dumps(event), flush=True)
            else:
                from appliance.cli_show import describe_event

                print(f"{time.strftime('%H:%M:%S')} {describe_event(event)}", flush=True)

    threading.Thread(target=poll_status, args=(path, emit, every), daemon=True).start()
    while True:
        emit(client.read())


def poll_status(path: str, emit: Callable[[dict[str, Any]], None], every: float) -> None:
    """Unsaved data, the background pass and NBD clients change without events: poll status
    (at most once per `every` seconds, so a busy disk prints a line a second, not a flood)."""
    last: dict[str, Any] = {}
    try:
        with ControlClient(path, timeout=30) as client:
            while True:
                st = client.request("status").get("data") or {}
                now = {k: st.get(k) for k in WATCHED}
                if last and now != last:
                    emit(
                        {
                            "event": "status",
                            "data": {
                                **now,
                                "dirty_bytes": st.get("dirty_bytes"),
                                "size": st.get("size"),
                                "background_progress": st.get("background_progress"),
                            },
                        }
                    )
                last = now
                time.sleep(every)
    except (ControlError, OSError):
        return  # the event stream says when the daemon goes away


def describe_status(data: dict[str, Any]) -> str:
    size = data.get("size") or 0
    share = f", {data.get('dirty_bytes', 0) / size:.1%} of the disk" if size else ""
    background = (
        "background pass done"
        if not data.get("pending_units")
        else f"background {data.get('background_progress') or 0:.0%} "
        f"({data['pending_units']} units waiting)"
    )
    return (
        f"unsaved {data.get('dirty_units')} units ({human(data.get('dirty_bytes') or 0)}"
        f"{share}); {background}; NBD clients {data.get('nbd_clients', 0)}"
    )
