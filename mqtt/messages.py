"""What goes over the broker: topic names, the request grammar, replies, status and events.

Requests are JSON objects `{"id": "...", "action": "restore", "args": {...}}` of at most
`max_payload` bytes; anything else gets an error reply naming what is wrong, and nothing runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.control.commands import Action

ID_MAX = 64  # characters in a request id
HISTORY_DEFAULT, HISTORY_MAX = 20, 200  # records a HISTORY reply carries


@dataclass(frozen=True)
class Topics:
    prefix: str
    node: str

    def _t(self, leaf: str) -> str:
        return f"{self.prefix}/{self.node}/{leaf}"

    @property
    def availability(self) -> str:
        return self._t("availability")

    @property
    def status(self) -> str:
        return self._t("status")

    @property
    def event(self) -> str:
        return self._t("event")

    @property
    def command(self) -> str:
        return self._t("cmd")

    @property
    def reply(self) -> str:
        return self._t("reply")

    def group(self, name: str) -> str:
        return f"{self.prefix}/group/{name}/cmd"


class RequestError(ValueError):
    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


def parse_request(payload: bytes, max_payload: int) -> tuple[str, Action, dict[str, Any]]:
    """(id, action, args) or RequestError with a reason a person can act on."""
    if len(payload) > max_payload:
        raise RequestError(
            f"request is {len(payload)} bytes; at most {max_payload} ([mqtt] max_payload)"
        )
    try:
        doc = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("request is not UTF-8 text: send a JSON object") from None
    except RecursionError:
        raise RequestError("malformed request: nested too deeply") from None
    except ValueError as e:
        raise RequestError(
            f'malformed request: not JSON ({e}); send {{"id": "...", "action": "status"}}'
        ) from None
    if not isinstance(doc, dict):
        raise RequestError('malformed request: send a JSON object {"id": ..., "action": ...}')
    rid = doc.get("id")
    if not isinstance(rid, str) or not 1 <= len(rid) <= ID_MAX or not rid.isprintable():
        raise RequestError(
            f'request id missing or bad: give "id", 1-{ID_MAX} printable '
            "characters, echoed in the reply"
        )
    unknown = set(doc) - {"id", "action", "args"}
    if unknown:
        raise RequestError(
            f"unknown field(s) {', '.join(sorted(unknown))}: only id, action and args", rid
        )
    known = ", ".join(a.value for a in Action)
    try:
        action = Action(str(doc.get("action")))
    except ValueError:
        raise RequestError(f"unknown action {doc.get('action')!r} (known: {known})", rid) from None
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise RequestError("args must be a JSON object", rid)
    return rid, action, _check_args(action, args, rid)


def _check_args(action: Action, args: dict[str, Any], rid: str) -> dict[str, Any]:
    if action is Action.HISTORY:
        limit = args.get("limit", HISTORY_DEFAULT)
        if (
            set(args) - {"limit"}
            or isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= HISTORY_MAX
        ):
            raise RequestError(f"history takes only limit, 1-{HISTORY_MAX}", rid)
        return {"limit": limit}
    if args:
        raise RequestError(f"{action.value} takes no args", rid)
    return {}


class RateLimit:
    """A token bucket: `burst` at once, then `rate` per second. Memory: two floats."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


def status_payload(
    snap: dict[str, Any], node: str, last: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The retained status: only what changes on purpose, so it is not sent every poll."""
    faults = [
        {"part": name, "reason": p.get("reason", ""), "hint": p.get("hint", "")}
        for name, p in sorted(snap.get("parts", {}).items())
        if p.get("state") == "failed"
    ]
    return {
        "node": node,
        "mode": snap.get("mode"),
        "epoch": snap.get("epoch"),
        "unsaved_bytes": snap.get("dirty_bytes", 0),
        "unsaved_units": snap.get("dirty_units", 0),
        "unit_size": snap.get("unit_size"),
        "size": snap.get("size"),
        "last_save": iso(snap.get("last_save")),
        "last_restore": iso(snap.get("last_restore")),
        "last_save_result": last.get("save"),
        "last_restore_result": last.get("restore"),
        "faults": faults,
        "host_connected": snap.get("host_connected"),
        "background_progress": round(float(snap.get("background_progress", 1.0)), 2),
    }


def event_payload(node: str, outcome: dict[str, Any], when: float) -> dict[str, Any]:
    """One SAVE/RESTORE outcome, with its history record when it ran."""
    return {
        "node": node,
        "action": outcome.get("action"),
        "ok": outcome.get("ok"),
        "source": outcome.get("source"),
        "reason": outcome.get("reason", ""),
        "record": outcome.get("data") if outcome.get("ok") else None,
        "time": iso(when),
    }


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=str).encode()
