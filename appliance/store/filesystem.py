"""The file system a store lives on: its free space, what the store allocated, whether a
store of a given size fits (the over-commit decision of `init` and the warning of `serve`),
and what to tell the user when it is full or cannot give space back.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from appliance.store.backing import fallocate
from appliance.store.format import Geometry

NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS)


def human(n: float) -> str:
    from appliance.store.cli import human as fmt

    return fmt(n)


def fs_free(fd_or_path: int | str) -> int:
    """Bytes an unprivileged writer may still allocate on the file system."""
    st = os.fstatvfs(fd_or_path) if isinstance(fd_or_path, int) else os.statvfs(fd_or_path)
    return st.f_bavail * st.f_frsize


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


# ----- creating a store ---------------------------------------------------------------------


def overcommit_problem(path: str, geo: Geometry, size: int) -> str | None:
    """Why a sparse store of this geometry may not fit its file system, or None if it fits.

    The free space counts what the target itself holds now, since init replaces it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    free = fs_free(folder)
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            free += st.st_blocks * 512
    except FileNotFoundError:
        pass
    if geo.total_size <= free:
        return None
    return (
        f"{path}: the store can grow to {human(geo.total_size)} (2 x the {human(size)} "
        f"disk + {human(geo.slot_off[0])} metadata) but its file system has only "
        f"{human(free)} free; nothing was changed. Choose a smaller --size, free some "
        "space, or pass --allow-overcommit (config: [store] allow_overcommit = true) to "
        'create it sparse anyway: writes then fail with "no space left" when the file '
        "system fills, and RESTORE still works and gives the space back"
    )


def allocate_metadata(fd: int, geo: Geometry) -> int:
    """Allocate superblocks, history ring and map (everything a command writes).

    Returns the bytes newly allocated; raises OSError (ENOSPC, or EOPNOTSUPP on a file system
    that cannot preallocate).
    """
    before = allocated(fd)
    fallocate(fd, 0, 0, geo.slot_off[0])  # mode 0 keeps the size; the file is that long already
    return max(0, allocated(fd) - before)


def overcommit_warning(info: dict[str, Any]) -> str | None:
    """The start-up warning for an over-committed store on a file, or None."""
    margin = info.get("margin_bytes")
    if margin is None or margin >= 0:
        return None
    return (
        f"the store can grow to {human(info['full_size'])} but only "
        f"{human(info['allocated_bytes'] + info['fs_free_bytes'])} fit on its file system "
        f'(over-committed by {human(-margin)}): writes will fail with "no space left" '
        "when it fills; RESTORE still works and gives the space back"
    )


FULL_HINT = (
    "RESTORE discards the unsaved writes and gives their space back; a SAVE gives back "
    "the old copies of what it saved once the background pass has run; or free space on "
    "the file system (or move the store to a larger one)"
)

PUNCH_HINT = (
    "nothing is lost and SAVE/RESTORE work; the background pass tries again with a back-off "
    "and the fault clears once a retry gives the space back. An I/O error here often means a "
    "failing disk: look at the system log (dmesg) and the disk's health, and keep an eye on "
    "the free space of its file system"
)
