"""Checks before `init` or `serve` creates anything, and OS errors told with path and way out.

Everything here runs before the first byte is written, so a refusal leaves nothing behind;
`removed_on_failure` covers what only the attempt itself can find out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator

from appliance.sizes import human

_WAY_OUT = {  # errno -> the way out; the OS's own words say what happened
    errno.EACCES: "run it as a user who may write there (e.g. with sudo) or choose another path",
    errno.EPERM: "check for an immutable file (lsattr) or a sandbox, run as root, or choose "
    "another path",
    errno.EROFS: "remount it read-write (mount -o remount,rw) or choose another path",
    errno.EISDIR: "give a file inside it, e.g. {path}/disk.img",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.ENOENT: "check the path (create a missing folder with mkdir -p)",
    errno.ENOSPC: "free some space or choose a smaller --size",
    errno.EFBIG: "choose a smaller --size or another file system",
    errno.EBUSY: "it is in use (mounted, or served already): unmount or stop it first",
    errno.ETXTBSY: "a running program uses it: stop that first",
}


def explain_os_error(e: OSError, path: str | None = None) -> str:
    """'PATH: what happened: what to do', never a bare '[Errno 1] Operation not permitted'."""
    where = path or e.filename or "?"
    hint = _WAY_OUT.get(e.errno or 0, "")
    what = e.strerror or str(e)
    return f"{where}: {what}" + (f"; {hint.format(path=where)}" if hint else "")


class Refused(Exception):
    """The target cannot take a store; nothing was created. The message says what to do."""


def check_target(path: str, total_size: int, disk_size: int) -> None:
    """Refuse before creating a `total_size`-byte store file (or using a device) at `path`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise Refused(explain_os_error(e, path)) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise Refused(explain_os_error(OSError(errno.EISDIR, os.strerror(errno.EISDIR)), path))
    if st is not None and stat.S_ISBLK(st.st_mode):
        _check_device(path, total_size, disk_size)
        return
    if st is not None:  # opening for writing changes nothing and gets the real errno
        try:
            os.close(os.open(path, os.O_WRONLY))
        except OSError as e:
            raise Refused(explain_os_error(e, path)) from None
    _check_file_room(path, total_size, disk_size)


def _check_device(path: str, total_size: int, disk_size: int) -> None:
    from appliance.store.backing import block_device_size

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise Refused(explain_os_error(e, path)) from None
    try:
        capacity = block_device_size(fd)
    finally:
        os.close(fd)
    if total_size > capacity:
        raise Refused(
            f"{path} holds {human(capacity)}; a {human(disk_size)} disk needs "
            f"{human(total_size)} (two copies and metadata): choose a --size of at "
            f"most about {human(max(0, capacity - total_size + 2 * disk_size) // 2)}"
            " or leave --size out for the largest that fits"
        )


def _check_file_room(path: str, total_size: int, disk_size: int) -> None:
    """A sparse file of the full size must be allowed where it will live (EFBIG, EROFS...)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise Refused(
            f"{folder}: the folder does not exist: create it (mkdir -p {folder}) "
            "or choose another path"
        )
    try:  # an unnamed file in the same file system: it vanishes when closed
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return  # no O_TMPFILE here: the attempt itself will tell (and clean up)
        raise Refused(explain_os_error(e, path)) from None
    try:
        os.ftruncate(fd, total_size)
    except OSError as e:
        if e.errno in (errno.EFBIG, errno.EINVAL):
            raise Refused(
                f"{path}: a {human(disk_size)} disk needs a {human(total_size)} file "
                f"(two copies and metadata), more than the file system at {folder} "
                "allows in one file: choose a smaller --size"
            ) from None
        raise Refused(explain_os_error(e, path)) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def removed_on_failure(path: str) -> Iterator[None]:
    """Remove `path` if it did not exist before and the body fails: no 0-byte leftovers."""
    existed = os.path.lexists(path)
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


def socket_in_use(path: str) -> bool:
    """Something answers on this Unix socket (a stale file from a dead daemon does not)."""
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # busy, or not ours to probe: do not take it over
    return True
