"""Commands that discard data, as a user types them: refused without a terminal unless --yes,
and honest about what else is affected (NBD clients with stale caches, a pairing nobody can use).
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_daemon_support import Served, env, pattern_matches, qemu_io, status

BIN = Path(sys.executable).parent  # .venv/bin: the commands as installed


def run(*argv: str, stdin=subprocess.DEVNULL, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        env=env(),
        stdin=stdin,
        timeout=timeout,
    )


@pytest.fixture
def served(tmp_path):
    s = Served(str(tmp_path / "disk.img"))
    yield s
    s.cleanup()


def test_restore_without_a_terminal_refuses_unless_yes(served):
    qemu_io(served.uri, "write -P 7 0 4k")
    for stdin in (subprocess.DEVNULL, subprocess.PIPE):  # cron, a pipe
        proc = run("savepoint", "restore", "--control", served.control, stdin=stdin)
        assert proc.returncode == 2 and "--yes" in proc.stderr and "nothing was done" in proc.stderr
    assert pattern_matches(served.uri, 0, 4096, 7)  # the unsaved write survived
    proc = run("savepoint", "restore", "--yes", "--control", served.control)
    assert proc.returncode == 0 and "1 units (4.0 KiB) discarded" in proc.stdout
    assert pattern_matches(served.uri, 0, 4096, 0)


def test_host_client_restore_refuses_without_a_terminal():
    proc = run("savepoint-host", "restore", "--port", "/dev/null")
    assert proc.returncode == 2 and "--yes" in proc.stderr


def test_fob_restore_refuses_without_a_terminal_unless_yes(tmp_path):
    keys = ["--keys", str(tmp_path / "fob.json"), "--timeout", "1", "--retry-for", "0"]
    for stdin in (subprocess.DEVNULL, subprocess.PIPE):  # cron, a pipe
        proc = run("savepoint-fob", "restore", *keys, stdin=stdin)
        assert proc.returncode == 2 and "--yes" in proc.stderr and "nothing was done" in proc.stderr
        assert "restore failed" not in proc.stderr  # refused before any Bluetooth was tried
    proc = run("savepoint-fob", "restore", "--yes", *keys)
    assert "nothing was done" not in proc.stderr and "not paired" in proc.stderr  # it went on
    proc = run("savepoint-fob", "save", *keys)  # SAVE discards nothing: no --yes needed
    assert "--yes" not in proc.stderr and "not paired" in proc.stderr


def test_restore_names_connected_clients_and_stale_caches(served):
    qemu_io(served.uri, "write -P 3 0 4k")
    holder = subprocess.Popen(
        ["qemu-io", "-f", "raw", served.uri],  # a VM, as far as we care
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while status(served.control).get("nbd_clients", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        main, sub = pty.openpty()
        try:
            proc = subprocess.Popen(
                [str(BIN / "savepoint"), "restore", "--control", served.control],
                stdin=sub,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env(),
                text=True,
            )
            os.write(main, b"y\n")
            out, err = proc.communicate(timeout=30)
        finally:
            os.close(main)
            os.close(sub)
        assert proc.returncode == 0, err
        assert "1 NBD client is connected: their caches will be stale" in out  # the prompt
        assert "1 NBD client was connected" in err and "stop or reconnect" in err  # the reply
        quiet = run("savepoint", "restore", "--yes", "--control", served.control)
        assert "caches are now stale" in quiet.stderr  # --yes asks nothing but still says it
    finally:
        holder.communicate("quit\n", timeout=30)


def test_pair_with_bluetooth_off_fails_with_the_reason(served):
    proc = run("savepoint", "pair", "--control", served.control)
    assert proc.returncode == 1
    assert "BLE is off" in proc.stderr and "[ble]" in proc.stderr
    assert "run now" not in proc.stdout


def test_fob_pair_without_bluez_says_what_to_install():
    e = env()
    e["DBUS_SYSTEM_BUS_ADDRESS"] = "unix:path=/nonexistent/system_bus_socket"
    proc = subprocess.run(
        [str(BIN / "savepoint-fob"), "pair", "--timeout", "2"],
        capture_output=True,
        text=True,
        env=e,
        timeout=60,
    )
    assert proc.returncode == 2 and "FileNotFoundError" not in proc.stderr
    assert "apt-get install bluez" in proc.stderr


@pytest.mark.parametrize("command", ["savepoint", "savepoint-host", "savepoint-fob"])
def test_version(command):
    from appliance import __version__

    proc = run(command, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"{command} {__version__}"


def test_watch_shows_unsaved_data_growing_and_clients_coming_and_going(served):
    watcher = subprocess.Popen(
        [str(BIN / "savepoint"), "watch", "--control", served.control],
        stdout=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        assert watcher.stdout is not None
        assert "state:" in watcher.stdout.readline()
        time.sleep(1.5)  # the poller has its first status
        qemu_io(served.uri, "write -P 1 0 64k")
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            lines.append(watcher.stdout.readline())
            if "unsaved 16 units (64.0 KiB" in lines[-1]:
                break
        assert "unsaved 16 units (64.0 KiB, 0.1% of the disk)" in lines[-1], lines
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(10)
        watcher.stdout.close()
