"""A real full file system: a small tmpfs mounted by the test, a store on it served by a real
`savepoint serve`, and qemu-io writing until the file system is full.

What the user sees: the write fails with "No space left on device" (NBD_ENOSPC, so QEMU's
werror=enospc can pause a VM), status, `watch` and the LED show "backing storage full", RESTORE
works on the full file system and gives the space back, the fault clears by itself, writes
work again and the saved data is intact.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from appliance.store.filesystem import fs_free
from gpio.gestures import Cue
from gpio.led import DaemonView, LedTimings, choose
from tests.nbd_helpers import wait_for
from tests.test_daemon_support import (
    SAVEPOINT,
    Served,
    cli,
    env,
    pattern_matches,
    qemu_io,
    status,
)

MiB = 1 << 20
FS_SIZE = 40 * MiB  # the store below can grow to 134 MiB
DISK = "64M"


@pytest.fixture
def small_fs() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io is not installed (apt-get install qemu-utils)")
    where = tempfile.mkdtemp(prefix="sp-full-")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", where],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False, capture_output=True)
        os.rmdir(where)


def init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SAVEPOINT, "init", *args], capture_output=True, text=True, env=env(), timeout=60
    )


def fill(uri: str) -> str:
    """Write 4 MiB pieces past the saved data until one fails; returns qemu-io's message."""
    for i in range(2, 16):
        proc = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"write -P 0xB2 {i * 4}M 4M", uri],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if "failed" in proc.stdout + proc.stderr:
            return proc.stdout + proc.stderr
    raise AssertionError("the 40 MiB file system never filled up")


def test_a_full_file_system_never_stops_restore_and_recovers_with_it(small_fs):
    store = os.path.join(small_fs, "disk.img")
    refused = init(store, "--size", DISK)
    assert refused.returncode == 1 and not os.path.exists(store)
    assert "134.0 MiB" in refused.stderr and "40.0 MiB free" in refused.stderr
    assert init(store, "--size", DISK, "--allow-overcommit").returncode == 0

    served = Served(store, size=None)
    watch = subprocess.Popen(
        [*SAVEPOINT, "watch", "--control", served.control],
        stdout=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        assert "over-committed by 94.0 MiB" in served.stderr()  # the start-up warning
        qemu_io(served.uri, "write -P 0xA1 0 8M")
        cli("save", control=served.control)

        message = fill(served.uri)
        assert "write failed: No space left on device" in message  # ENOSPC, not EIO
        st = status(served.control)
        assert st["parts"]["storage"]["state"] == "failed"
        assert st["space"]["full"] and st["space"]["fs_free_bytes"] < 4 * MiB
        assert "backing storage full" in st["parts"]["storage"]["reason"]
        view = DaemonView()
        view.apply_state(st)
        assert choose(view, Cue.IDLE, False, LedTimings()).name == "storage_full"
        text = cli("status", control=served.control).stdout
        assert "FAULT        backing storage full" in text and "RESTORE" in text

        out = cli("restore", "--yes", control=served.control).stdout
        assert out.startswith("RESTORE done")
        assert wait_for(lambda: status(served.control)["parts"]["storage"]["state"] == "up", 15)
        assert fs_free(small_fs) > 20 * MiB  # the discarded writes' space came back
        assert not status(served.control)["space"]["full"]
        # metadata + the saved 8 MiB, once the pass's steps (10 ms apart) punched every page
        assert wait_for(
            lambda: status(served.control)["space"]["allocated_bytes"] < 16 * MiB, 15
        ), status(served.control)["space"]

        qemu_io(served.uri, "write -P 0xC3 8M 16M")  # writes work again
        assert pattern_matches(served.uri, 0, 8 * MiB, 0xA1)  # the saved data is intact
        cli("save", control=served.control)
        assert pattern_matches(served.uri, 8 * MiB, 16 * MiB, 0xC3)
    finally:
        watch.send_signal(signal.SIGINT)
        events = watch.communicate(timeout=30)[0]
        assert served.stop() == 0
        served.cleanup()
    assert "part storage failed: backing storage full" in events
    assert "part storage is up again" in events


def test_save_and_restore_work_on_a_full_file_system(small_fs):
    """Both commands write only what init allocated (the map too): neither meets ENOSPC."""
    from appliance.store import Store, StoreFullError, create_store

    path = os.path.join(small_fs, "s.img")
    create_store(path, 64 * MiB, allow_overcommit=True)
    with Store.open(path) as st:
        written = 0
        with pytest.raises(StoreFullError):
            for off in range(0, 64 * MiB, MiB):
                st.write(off, bytes([off // MiB + 1]) * MiB)
                written = off + MiB
        assert fs_free(small_fs) < MiB and written > 16 * MiB
        st.save("test")  # flush (map sectors all over the map), ring record, superblock
        st.restore("test")
        st.save("test")
    with Store.open(path) as st:
        for off in range(0, written, MiB):
            assert st.read_saved(off, MiB) == bytes([off // MiB + 1]) * MiB
        assert st.history()[-3]["action"] == "save"
