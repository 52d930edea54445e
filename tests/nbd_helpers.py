"""Shared fixtures for the NBD tests: a real store on a temp file, served on a Unix socket."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from appliance.nbd_server import NbdServer
from appliance.store import Store, create_store

MiB = 1 << 20
SYS_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd belongs to the system interpreter
ENV = {**os.environ, "PATH": "/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", "")}


@dataclass
class Served:
    server: NbdServer
    store: Store
    path: str  # the store's file
    sock: str

    @property
    def uri(self) -> str:
        return self.server.uris[0]


@contextmanager
def serve(tmp_path, size: int = 64 * MiB, unit: int = 4096, create: bool = True,
          **kwargs) -> Iterator[Served]:
    path = str(tmp_path / "disk.sp")
    if create:
        create_store(path, size, unit=unit)
    store = Store.open(path)
    sock = str(tmp_path / "nbd.sock")
    server = NbdServer(store, unix_path=sock, **kwargs)
    server.start()
    try:
        yield Served(server, store, path, sock)
    finally:
        server.stop()
        store.close()


def run(*argv: str, timeout: float = 120, check: bool = True,
        **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV, **kw)
    if check and proc.returncode:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def libnbd(script: str, *args: str, timeout: float = 120):
    """Run a python3-libnbd script (system python); it prints one JSON value: return it."""
    proc = subprocess.run([SYS_PYTHON, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def snapshot(store: Store) -> tuple[bytes, bytes, int]:
    """Everything a client could notice: visible image, saved image, epoch."""
    return store.read(0, store.size), store.read_saved(0, store.size), store.epoch
