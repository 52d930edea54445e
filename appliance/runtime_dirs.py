"""The directory the sockets live in, made private and checked before anyone trusts it.

The default runtime directory ($XDG_RUNTIME_DIR/savepoint, /run/savepoint for root, or
/tmp/savepoint-<uid> when XDG_RUNTIME_DIR is unset) decides whose socket a CLI command
reaches. In /tmp anyone can create it first and answer `"ok": true` to a SAVE that never
happened, so both the daemon and the CLI refuse a directory that is a symlink, belongs to
someone else or is writable by group or others, and say why.
"""

from __future__ import annotations

import os
import stat

SYSTEM_RUNTIME_DIR = "/run/savepoint"  # the installed daemon's (systemd RuntimeDirectory)


def runtime_dir() -> str:
    """Where sockets live: /run/savepoint for root, $XDG_RUNTIME_DIR/savepoint otherwise."""
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/savepoint-{os.geteuid()}"
    return os.path.join(base, "savepoint") if "XDG_RUNTIME_DIR" in os.environ else base


def default_control_path() -> str:
    return os.environ.get("SAVEPOINT_CONTROL") or os.path.join(runtime_dir(), "control.sock")


def find_control_path() -> str:
    """The control socket a CLI command talks to: SAVEPOINT_CONTROL, else this user's own
    daemon, else the system daemon's (/run/savepoint, open to the `savepoint` group)."""
    own = default_control_path()
    if "SAVEPOINT_CONTROL" in os.environ or os.path.exists(own):
        return own
    system = os.path.join(SYSTEM_RUNTIME_DIR, "control.sock")
    return system if os.path.exists(system) else own


def default_nbd_path() -> str:
    return os.path.join(runtime_dir(), "nbd.sock")


class UnsafeDir(Exception):
    """The runtime directory cannot be trusted; the message says why and what to do."""


def check(path: str, owners: tuple[int, ...]) -> None:
    """Raise UnsafeDir unless `path` is a real directory owned by one of `owners` that only
    its owner may write to."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    fix = f"remove it (`sudo rm -r {path}`) and start again, or set XDG_RUNTIME_DIR"
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDir(
            f"{path} is a symlink (to {os.readlink(path)}), not the runtime "
            f"directory itself: someone may be redirecting the sockets; {fix}"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDir(f"{path} is not a directory; {fix}")
    if st.st_uid not in owners:
        raise UnsafeDir(
            f"{path} belongs to uid {st.st_uid}, not to uid {os.geteuid()}: "
            f"another user may have made it to receive your commands; {fix}"
        )
    if st.st_mode & 0o022:
        raise UnsafeDir(
            f"{path} is writable by {'group' if st.st_mode & 0o020 else 'others'}"
            f" (mode {stat.S_IMODE(st.st_mode):04o}): anyone there could replace "
            f"the sockets; `chmod go-w {path}`, or {fix}"
        )


def prepare(path: str, gid: int | None = None) -> None:
    """For the daemon: create `path` 0700 (0750 + `gid` when a group must reach the control
    socket) if it is missing; refuse it, as `check` does, if it is there but not ours."""
    if not os.path.lexists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # someone was faster: the check below decides whether that is fine
        else:
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, 0o750 if gid is not None else 0o700)  # not the umask's choice
    check(path, (os.geteuid(),))


def check_client(path: str) -> None:
    """For the CLI: the directory of the socket it is about to talk to, which must be the
    installed daemon's (root's) or this user's own."""
    check(path, (0,) if path == SYSTEM_RUNTIME_DIR else (os.geteuid(),))
