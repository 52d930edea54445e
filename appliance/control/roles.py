"""Who is on the other end of the control socket, and what that caller may do.

The kernel tells us the caller's uid, gid and supplementary groups (SO_PEERCRED,
SO_PEERGROUPS): nothing the caller says about itself counts. Two roles:

  reader - anyone the socket's mode lets in (the `savepoint` group): status, history,
           watch, `fobs list`, `buttons list`
  admin  - root, the daemon's own uid (a user's `savepoint serve`), or a member of the admin
           group (`[control] admin_group`, default `savepoint-admin`): everything else
           (SAVE, RESTORE, UNLOCK, LOCK, PAIR, fob rename/revoke, other part commands)

docs/security.md and docs/protocol.md hold the table.
"""

from __future__ import annotations

import grp
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

READ_COMMANDS = frozenset({"status", "history", "watch"})
READ_PART_OPS = {"fobs": frozenset({"list"}), "buttons": frozenset({"list"})}  # ops that only read
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python 3.11 lacks the name


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def peer_of(sock: Any) -> Peer | None:
    """The caller's credentials as the kernel saw them at connect(); None off Linux."""
    if sock is None:
        return None
    try:
        pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
    except (OSError, AttributeError):
        return None
    return Peer(pid, uid, gid, _peer_groups(sock, pid))


def _peer_groups(sock: Any, pid: int) -> tuple[int, ...]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        return struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError:  # an old kernel, or over 1,024 groups: ask /proc instead
        try:
            with open(f"/proc/{pid}/status") as f:
                line = next((ln for ln in f if ln.startswith("Groups:")), "Groups:")
            return tuple(int(g) for g in line.split()[1:])
        except (OSError, ValueError):
            return ()


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid if name else None
    except KeyError:
        return None


class Roles:
    def __init__(self, admin_group: str = "savepoint-admin") -> None:
        self.admin_group = admin_group

    def is_admin(self, peer: Peer | None) -> bool:
        if peer is None:  # the kernel would not say who it is: trust it to read, no more
            return False
        if peer.uid in (0, os.geteuid()):
            return True
        gid = _gid(self.admin_group)  # looked up each time: the group may be made later
        return gid is not None and (gid == peer.gid or gid in peer.groups)

    def refusal(self, peer: Peer | None, cmd: str, args: dict[str, Any]) -> str:
        """'' when the caller may run `cmd`, else one line saying which group it needs."""
        op = args.get("op", "list")
        if cmd in READ_COMMANDS or (isinstance(op, str) and op in READ_PART_OPS.get(cmd, ())):
            return ""
        if self.is_admin(peer):
            return ""
        who = f"uid {peer.uid}" if peer is not None else "a caller without credentials"
        what = f"{cmd} {op}" if cmd in READ_PART_OPS else cmd
        group = f"the `{self.admin_group}` group" if self.admin_group else "no admin group"
        missing = (
            ""
            if _gid(self.admin_group) is not None or not self.admin_group
            else f" (which does not exist yet: `sudo groupadd {self.admin_group}`)"
        )
        return (
            f"{what.upper()} needs root or {group}{missing}; {who} may only "
            f"read (status, history, watch): run it with sudo, or ask the admin to "
            f"add you to {group}"
        )
