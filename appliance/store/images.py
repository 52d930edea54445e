"""Disk images in and out: `savepoint init TARGET --from IMAGE` and `savepoint export`.

Import serves the new, empty store over NBD on a private socket and lets `qemu-img convert`
write the image into it (any format qemu-img reads: raw, qcow2, vmdk, vdi...). The store
starts all zeros and qemu-img is told so (--target-is-zero), so it writes only data: holes
stay holes. The result is then SAVEd: the image is the saved state and RESTORE returns to it.

Export writes the saved or the working state. Offline it reads the store directly and writes
a sparse raw file (zero chunks are skipped, not written); another format is converted from
that with qemu-img. A served store is read through its daemon's NBD export (the working
state; the saved state too when nothing is unsaved, since they are then the same).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.store.core import Store

CHUNK = 1 << 20
Progress = Callable[[int, int], None]


class ImageError(Exception):
    """The image cannot be read or written; the message says why and what to do."""


def image_info(path: str) -> tuple[str, int]:
    """(format, virtual size) as qemu-img sees the image."""
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such image file")
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", path], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        raise ImageError("qemu-img is not installed (Debian: apt-get install qemu-utils)") from None
    if out.returncode != 0:
        raise ImageError(f"{path}: qemu-img cannot read it: {out.stderr.strip()}")
    info = json.loads(out.stdout)
    return info["format"], int(info["virtual-size"])


def import_image(store: Store, image: str, fmt: str, progress: bool) -> None:
    """Write `image` into the freshly created (all-zero) `store` and SAVE it as the import."""
    from appliance.nbd.server import NbdServer

    folder = tempfile.mkdtemp(prefix="savepoint-import-")
    sock = os.path.join(folder, "nbd.sock")
    server = NbdServer(store, unix_path=sock)
    server.start()
    try:
        cmd = [
            "qemu-img",
            "convert",
            "-n",
            "--target-is-zero",
            "-f",
            fmt,
            "-O",
            "raw",
            *(["-p"] if progress else []),
            image,
            f"nbd+unix:///savepoint?socket={sock}",
        ]
        res = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise ImageError(f"copying {image} failed: {res.stderr.strip()}")
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    store.save("import")


def is_served(target: str) -> bool:
    """A daemon holds the store's exclusive lock (Store.open takes it to serve)."""
    fd = os.open(target, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def export_offline(target: str, out: str, saved: bool, fmt: str, progress: Progress) -> int:
    """Write the saved (or working) state to `out`; returns the bytes of data written."""
    from appliance.store import Store

    with Store.open(target, readonly=True) as st:
        if fmt == "raw":
            return _write_raw(st, out, saved, progress)
        with _temp_beside(out) as raw:
            written = _write_raw(st, raw, saved, progress)
            convert(raw, "raw", out, fmt, show=False)
            return written


def _write_raw(st: Store, out: str, saved: bool, progress: Progress) -> int:
    zero = bytes(CHUNK)
    written = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, st.size, CHUNK):
            n = min(CHUNK, st.size - off)
            data = st.read_saved(off, n) if saved else st.read(off, n)
            if data != zero[:n]:  # a zero chunk stays a hole in the output
                os.pwrite(fd, data, off)
                written += n
            progress(off + n, st.size)
        os.ftruncate(fd, st.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def convert(src: str, src_fmt: str, out: str, fmt: str, show: bool) -> None:
    """qemu-img convert, sparse (it skips zeros by default)."""
    cmd = ["qemu-img", "convert", "-f", src_fmt, "-O", fmt, *(["-p"] if show else []), src, out]
    res = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise ImageError(f"writing {out} failed: {res.stderr.strip()}")


@contextlib.contextmanager
def _temp_beside(out: str) -> Iterator[str]:
    fd, path = tempfile.mkstemp(
        prefix=".savepoint-export-", dir=os.path.dirname(os.path.abspath(out))
    )
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def export_served(uri: str, out: str, fmt: str) -> None:
    """The daemon's NBD export (the working state) into `out`, with qemu-img."""
    convert(uri, "raw", out, fmt, show=sys.stderr.isatty())
