"""savepoint-host: talk to a Savepoint appliance from the computer it is plugged into.

The appliance's CDC-ACM serial port needs no driver on Linux, macOS or Windows. The port is
found by USB vendor/product ID (and serial number, if given) with pyserial's list_ports;
requests use the local socket's JSON-lines grammar. The appliance decides what the host may
do: SAVE is refused while it is LOCKED, and the host can never unlock it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import serial
from serial.tools import list_ports

from appliance import __version__

DEFAULT_VID = 0x1D6B  # appliance.usb.gadget defaults
DEFAULT_PID = 0x0104
COMMANDS = ("status", "save", "restore", "history", "lock")


class HostError(Exception):
    """Reaching the appliance failed; the message says what to check."""


def find_port(vid: int = DEFAULT_VID, pid: int = DEFAULT_PID, serial_number: str = "") -> str:
    """The one serial port whose USB IDs (and serial number, if given) match."""
    found = [
        p
        for p in list_ports.comports()
        if p.vid == vid and p.pid == pid and (not serial_number or p.serial_number == serial_number)
    ]
    if not found:
        raise HostError(
            f"no Savepoint appliance found (USB {vid:04x}:{pid:04x}"
            f"{' serial ' + serial_number if serial_number else ''}): "
            "check the cable, or give --port"
        )
    if len(found) > 1:
        names = ", ".join(f"{p.device} (serial {p.serial_number})" for p in found)
        raise HostError(f"several appliances found: {names}; choose one with --serial")
    return found[0].device


def request(
    port: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 120.0
) -> dict[str, Any]:
    """Send one request line and return the reply object."""
    line = json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n"
    try:
        with serial.Serial(port, 115200, timeout=timeout) as conn:
            conn.reset_input_buffer()  # a reply to an earlier, abandoned request
            conn.write(line)
            conn.flush()
            reply = conn.readline()
    except serial.SerialException as e:
        raise HostError(f"{port}: {e}") from None
    if not reply.endswith(b"\n"):
        raise HostError(f"{port}: no answer within {timeout:g} s")
    try:
        obj = json.loads(reply)
    except json.JSONDecodeError:
        raise HostError(f"{port}: garbled answer {reply[:80]!r}") from None
    if not isinstance(obj, dict):
        raise HostError(f"{port}: unexpected answer {obj!r}")
    return obj


def _hex(text: str) -> int:
    return int(text, 16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="savepoint-host", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--port", help="serial port (default: found by USB IDs)")
    p.add_argument("--vid", type=_hex, default=DEFAULT_VID, help="USB vendor ID, hex")
    p.add_argument("--pid", type=_hex, default=DEFAULT_PID, help="USB product ID, hex")
    p.add_argument("--serial", default="", help="USB serial number of the appliance")
    p.add_argument("--limit", type=int, help="history: only the last N records")
    p.add_argument(
        "--volume",
        action="append",
        default=[],
        help="save: flush this mount point or drive (E:) first; default on Linux: "
        "every filesystem on the Savepoint disk (repeatable)",
    )
    p.add_argument("--no-flush", action="store_true", help="save: do not flush the host first")
    p.add_argument(
        "--now",
        action="store_true",
        help="save: commit at once, without waiting for the host to stop writing",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for an answer (default 120; save: 660, as a SAVE "
        "may wait for the host to go quiet)",
    )
    p.add_argument("--json", action="store_true", help="print the appliance's JSON reply")
    p.add_argument("--yes", "-y", action="store_true", help="restore: do not ask first")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def confirmed(args: argparse.Namespace) -> bool:
    """RESTORE discards data: ask on a terminal, refuse without one unless --yes."""
    if args.command != "restore" or args.yes:
        return True
    if not sys.stdin.isatty():
        print(
            "savepoint-host: RESTORE discards everything written since the last SAVE; with "
            "no terminal to confirm on, nothing was done: add --yes to restore anyway",
            file=sys.stderr,
        )
        return False
    answer = input("Discard everything written since the last SAVE? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd_args: dict[str, Any] = {}
    if args.command == "history" and args.limit:
        cmd_args["limit"] = args.limit
    if args.command == "save" and args.now:
        cmd_args["now"] = True
    timeout = args.timeout or (660.0 if args.command == "save" else 120.0)
    if not confirmed(args):
        return 2
    try:
        port = args.port or find_port(args.vid, args.pid, args.serial)
        if args.command == "save" and not args.no_flush:
            from appliance.usb.host_flush import flush

            for line in flush(port, args.volume):  # what is in the host's cache is not saved
                print(f"savepoint-host: {line}", file=sys.stderr)
        reply = request(port, args.command, cmd_args, timeout)
    except HostError as e:
        print(f"savepoint-host: {e}", file=sys.stderr)
        return 2
    if args.json or reply.get("ok"):
        print(json.dumps(reply if args.json else reply.get("data", {}), indent=2, default=str))
    if not reply.get("ok"):
        # the reason is the appliance's own sentence ("SAVE refused: the appliance is LOCKED ...")
        print(
            f"savepoint-host: {reply.get('reason') or args.command.upper() + ' refused'}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
