"""`savepoint daemon` as a subprocess: failing parts, systemd notify, journald logging,
SIGKILL in the middle of a command, on_boot restore, config errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests.test_daemon_support import (
    SAVEPOINT,
    Served,
    cli,
    env,
    pattern_matches,
    qemu_io,
    request,
    short_dir,
    status,
)


@pytest.fixture
def workdir():
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(d: str, extra: str = "") -> str:
    path = os.path.join(d, "config.toml")
    with open(path, "w") as f:
        f.write(f"""
[store]
path = "{d}/disk.img"
create = true
size = "16M"
[nbd]
socket = "{d}/nbd.sock"
[control]
socket = "{d}/c.sock"
{extra}
""")
    return path


def start_daemon(
    d: str, config: str, extra_env: dict[str, str] | None = None, stderr=None
) -> subprocess.Popen:
    e = env()
    e.update(extra_env or {})
    proc = subprocess.Popen(
        [*SAVEPOINT, "daemon", "--config", config],
        env=e,
        stdout=subprocess.DEVNULL,
        stderr=stderr or open(os.path.join(d, "log"), "a"),
    )  # noqa: SIM115
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}")
        if os.path.exists(os.path.join(d, "c.sock")):
            try:
                status(os.path.join(d, "c.sock"))
                return proc
            except AssertionError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("daemon did not come up")


def log_text(d: str) -> str:
    with open(os.path.join(d, "log")) as f:
        return f.read()


PARTS_ON = """
[gadget]
enabled = true
configfs = "{d}/no-configfs"
sysfs = "{d}/no-sysfs"
[serial]
enabled = true
[gpio]
enabled = true
[ble]
enabled = true
bus_address = "unix:path={d}/no-dbus"
"""


def test_parts_that_cannot_start_are_reported_once_and_the_rest_runs(workdir):
    os.makedirs(os.path.join(workdir, "no-configfs"))
    config = write_config(workdir, PARTS_ON.format(d=workdir))
    proc = start_daemon(workdir, config)
    control = os.path.join(workdir, "c.sock")
    try:
        time.sleep(2.5)  # a few ticks: failures must not be repeated
        st = status(control)
        for part in ("gadget", "serial", "gpio", "ble"):
            assert st["parts"][part]["state"] == "failed", st["parts"]
            assert st["parts"][part]["reason"]
            assert log_text(workdir).count(f"part {part} failed") == 1
        assert st["parts"]["nbd"]["state"] == "up" and st["mode"] == "locked"
        text = cli("status", control=control).stdout
        assert "part gadget  failed: " in text
        uri = f"nbd+unix:///savepoint?socket={workdir}/nbd.sock"
        qemu_io(uri, "write -P 5 0 64k")
        assert pattern_matches(uri, 0, 65536, 5)
        refused = cli("save", control=control, check=False)
        assert refused.returncode == 1 and "LOCKED" in refused.stderr
        cli("unlock", control=control)
        cli("save", control=control)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_systemd_ready_watchdog_status_stopping(workdir):
    config = write_config(workdir)
    notify = os.path.join(workdir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify)
    sock.settimeout(20)
    proc = start_daemon(workdir, config, {"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "400000"})
    messages = []
    try:
        while sum("WATCHDOG=1" in m for m in messages) < 3:
            messages.append(sock.recv(4096).decode())
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    sock.settimeout(0.5)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except TimeoutError:
        pass
    sock.close()
    assert rc == 0
    ready = [m for m in messages if "READY=1" in m]
    assert len(ready) == 1 and "STATUS=locked, epoch 1" in ready[0]
    assert messages.index(ready[0]) < messages.index("WATCHDOG=1")
    assert any(m.startswith("STOPPING=1") for m in messages)


def test_journald_gets_priorities_and_no_timestamps(workdir):
    config = write_config(workdir)
    logfile = os.path.join(workdir, "journal")
    with open(logfile, "w") as f:
        st = os.fstat(f.fileno())
        proc = start_daemon(
            workdir, config, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stderr=f
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    lines = open(logfile).read().splitlines()
    assert lines and all(line.startswith("<") for line in lines)
    assert any(line.startswith("<6>savepoint.daemon: ready") for line in lines)


def _raw_request(control: str, cmd: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(control)
    s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
    return s


@pytest.mark.parametrize("command", ["save", "restore"])
def test_sigkill_in_the_middle_of_a_command_keeps_the_saved_image(tmp_path, command):
    disk = str(tmp_path / "disk.img")
    served = Served(disk, size="32M")
    try:
        qemu_io(served.uri, "write -P 0xAA 0 4M", "flush")
        cli("save", control=served.control)
        for delay in (0.0, 0.003, 0.03):
            qemu_io(served.uri, "write -P 0xBB 0 4M", "flush")
            before = status(served.control)["epoch"]
            s = _raw_request(served.control, command)
            time.sleep(delay)
            served.proc.kill()
            served.proc.wait()
            s.close()
            served.close()
            served = Served(disk, size=None, sockets=served.dir)
            st = status(served.control)
            hist = request(served.control, "history")
            committed = st["epoch"] == before + 1
            assert st["epoch"] in (before, before + 1)
            if committed:
                assert hist["data"]["history"][-1]["action"] == command
            # the visible disk is the state before or after the command, never a mix
            expect_now = 0xAA if command == "restore" and committed else 0xBB
            assert pattern_matches(served.uri, 0, 4 << 20, expect_now)
            assert request(served.control, "restore")["ok"]
            saved = 0xBB if command == "save" and committed else 0xAA
            assert pattern_matches(served.uri, 0, 4 << 20, saved)
            if saved == 0xBB:  # back to A as the saved image for the next round
                qemu_io(served.uri, "write -P 0xAA 0 4M", "flush")
                assert request(served.control, "save")["ok"]
        assert served.stop() == 0
    finally:
        served.cleanup()


def test_on_boot_policy_discards_unsaved_work_at_start(workdir):
    config = write_config(workdir)
    control = os.path.join(workdir, "c.sock")
    uri = f"nbd+unix:///savepoint?socket={workdir}/nbd.sock"
    proc = start_daemon(workdir, config)
    qemu_io(uri, "write -P 3 0 64k", "flush")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc = start_daemon(workdir, config)  # policy "never": still there
    assert pattern_matches(uri, 0, 65536, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    config = write_config(workdir, '[restore]\npolicy = "on_boot"\n')
    proc = start_daemon(workdir, config)
    try:
        assert pattern_matches(uri, 0, 65536, 0)
        hist = request(control, "history")["data"]["history"]
        assert [(r["action"], r["source"]) for r in hist] == [("restore", "policy")]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_config_errors_stop_before_anything_starts(workdir):
    config = write_config(workdir, '[lock]\nrelock_after = "soon"\n')
    proc = subprocess.run(
        [*SAVEPOINT, "daemon", "--config", config],
        capture_output=True,
        text=True,
        env=env(),
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "[lock] relock_after: expected" in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "disk.img"))
    good = write_config(workdir)
    check = subprocess.run(
        [*SAVEPOINT, "daemon", "--config", good, "--check"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=30,
    )
    assert check.returncode == 0 and check.stdout.endswith(": OK\n")
