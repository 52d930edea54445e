"""Creating a store on a regular file (sparse) or a block device, refusing to clobber data."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import time
from collections.abc import Callable

from appliance.store.backing import Backing, FileBacking, block_device_size
from appliance.store.filesystem import NO_FALLOCATE, allocate_metadata, human, overcommit_problem
from appliance.store.format import (
    DEFAULT_HIST_CAP,
    SB_OFFSETS,
    SB_SIZE,
    FormatError,
    Geometry,
    Superblock,
    geometry_for_capacity,
    plan_geometry,
    superblock_copies,
)

ZERO_CHUNK = 1 << 20


class InitError(Exception):
    """init refused; the message says what was found and what to do."""


def describe_existing(path: str) -> str | None:
    """What the target already holds (a store, partition table, file system), or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        head = os.pread(fd, 2 * SB_SIZE, 0)
    finally:
        os.close(fd)
    for sb in superblock_copies(head):
        if not isinstance(sb, FormatError):
            return f"a Savepoint store ({sb.geometry.logical_size} bytes, epoch {sb.epoch})"
        if str(sb) != "no Savepoint magic":
            return f"a Savepoint store that cannot be read ({sb})"
    found = _blkid(path)
    if found:
        return found
    if stat.S_ISREG(st.st_mode) and st.st_size and any(head):
        return f"{st.st_size} bytes of data"
    return None


def _blkid(path: str) -> str | None:
    """Ask util-linux's blkid for partition tables and file systems (low-level probe)."""
    try:
        out = subprocess.run(
            ["blkid", "-p", "-o", "export", path], capture_output=True, text=True, timeout=30
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    tags = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if "PTTYPE" in tags:
        return f"a partition table ({tags['PTTYPE']})"
    if "TYPE" in tags:
        label = f", label {tags['LABEL']!r}" if "LABEL" in tags else ""
        return f"a file system ({tags['TYPE']}{label})"
    return None


def _allocate_metadata(path: str, geo: Geometry) -> None:
    """Superblocks, ring and map get their blocks now: a full file system cannot stop a
    command later (docs/format.md, "Allocation and punching")."""
    fd = os.open(path, os.O_RDWR)
    try:
        allocate_metadata(fd, geo)
    except OSError as e:
        if e.errno not in NO_FALLOCATE:  # ENOSPC: not even the metadata fits
            os.unlink(path)
            raise InitError(
                f"{path}: no room for the store's {human(geo.slot_off[0])} of "
                f"metadata ({e}); nothing was created"
            ) from None
        # a file system without fallocate: blocks are allocated on first write instead
    finally:
        os.close(fd)


def create_store(
    path: str,
    size: int | None,
    unit: int = 4096,
    force: bool = False,
    hist_cap: int = DEFAULT_HIST_CAP,
    progress: Callable[[int, int], None] | None = None,
    allow_overcommit: bool = False,
) -> Geometry:
    """Create an empty store: every unit reads as zeros, epoch 1, no history.

    On a regular file the store is sparse; it is refused when its full size exceeds the free
    space of the file system, unless allow_overcommit (filesystem.overcommit_problem).
    """
    is_block = os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode)
    existing = describe_existing(path)
    if existing and not force:
        raise InitError(
            f"{path} already holds {existing}; nothing was changed. Use --force to overwrite it."
        )
    if is_block:
        fd = os.open(path, os.O_RDONLY)
        try:
            capacity = block_device_size(fd)
        finally:
            os.close(fd)
        geo = plan_geometry(size, unit, hist_cap) if size else geometry_for_capacity(capacity, unit)
        if geo.total_size > capacity:
            raise InitError(
                f"{path} has {capacity} bytes; a {size}-byte disk needs {geo.total_size}"
            )
    else:
        if not size:
            raise InitError("a store on a regular file needs --size (for example --size 8G)")
        geo = plan_geometry(size, unit, hist_cap)
        problem = overcommit_problem(path, geo, size)
        if problem and not allow_overcommit:
            raise InitError(problem)
        # A fresh sparse file, 0600 even if an older file was readable: it holds the disk.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, geo.total_size)
        finally:
            os.close(fd)
        _allocate_metadata(path, geo)
    backing = FileBacking(path)
    try:  # a regular file is already all zeros; a device needs its metadata zeroed
        write_fresh_store(backing, geo, zero_meta=is_block, progress=progress)
    finally:
        backing.close()
    return geo


def write_fresh_store(
    backing: Backing,
    geo: Geometry,
    zero_meta: bool,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Make `backing` an empty store. Whatever it held is unreachable before the new
    superblock can be durable: a cut at any point leaves the old store, no store, or the new
    one, never the new superblock over the old map."""
    backing.pwrite(bytes(2 * SB_SIZE), 0)  # the old store (if any) can no longer be opened
    backing.sync()
    if zero_meta:
        _zero(backing, 2 * SB_SIZE, geo.meta_off + geo.meta_len, progress)
        backing.sync()
    sb = Superblock(geometry=geo, uuid=secrets.token_bytes(16), created_ns=time.time_ns())
    backing.pwrite(sb.pack(), SB_OFFSETS[0])
    backing.sync()


def _zero(
    backing: Backing, start: int, end: int, progress: Callable[[int, int], None] | None
) -> None:
    chunk = bytes(ZERO_CHUNK)
    for off in range(start, end, ZERO_CHUNK):
        backing.pwrite(chunk[: min(ZERO_CHUNK, end - off)], off)
        if progress:
            progress(off + ZERO_CHUNK - start, end - start)
