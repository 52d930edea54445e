"""The host computer as the adversary, against a real `savepoint daemon` whose serial part
runs on a pseudo-terminal: a host that never reads, a flood of requests, a line of 5,000
brackets, a host that tries to keep an unlock open. docs/security.md points here."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from appliance.control.client import ControlClient
from tests.test_daemon import start_daemon, write_config
from tests.test_daemon_support import short_dir

STATUS = b'{"cmd": "status"}\n'


@dataclass
class Host:
    master: int  # the host computer's end of the serial line
    proc: subprocess.Popen
    control: str
    dir: str

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view) :]

    def read_reply(self, timeout: float = 10) -> bytes:
        out = b""
        deadline = time.monotonic() + timeout
        while not out.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise AssertionError(f"no reply from the appliance within {timeout} s: {out!r}")
            out += os.read(self.master, 65536)
        return out

    def drain(self, quiet: float = 0.5) -> int:
        """Read and throw away whatever the appliance sent until it is quiet."""
        total = 0
        while select.select([self.master], [], [], quiet)[0]:
            total += len(os.read(self.master, 1 << 20))
        return total

    def talk(self, line: bytes) -> bytes:
        self.drain(0.2)
        self.write(line)
        return self.read_reply()

    def status(self, timeout: float = 1.0) -> tuple[float, dict]:
        """The control socket's STATUS and how long it took; fails past `timeout`."""
        t0 = time.monotonic()
        with ControlClient(self.control, timeout=timeout + 4) as client:
            reply = client.request("status")
        took = time.monotonic() - t0
        assert reply["ok"], reply
        assert took < timeout, f"control socket took {took:.2f} s to answer STATUS"
        return took, reply["data"]

    def cli(self, cmd: str) -> dict:
        with ControlClient(self.control, timeout=30) as client:
            return client.request(cmd)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


@pytest.fixture
def host_factory() -> Iterator:
    made: list[Host] = []

    def make(extra: str = "") -> Host:
        d = short_dir()
        master, slave = pty.openpty()
        config = write_config(
            d, f'[serial]\nenabled = true\ndevice = "{os.ttyname(slave)}"\n' + extra
        )
        proc = start_daemon(d, config)
        os.close(slave)  # the daemon holds its own end
        host = Host(master, proc, os.path.join(d, "c.sock"), d)
        made.append(host)
        return host

    yield make
    for host in made:
        host.proc.send_signal(signal.SIGTERM)
        try:
            host.proc.wait(30)
        finally:
            if host.proc.poll() is None:
                host.proc.kill()
            os.close(host.master)
            shutil.rmtree(host.dir, ignore_errors=True)


def test_a_host_that_never_reads_cannot_freeze_the_appliance(host_factory) -> None:
    host = host_factory()
    assert b'"ok": true' in host.talk(STATUS)
    host.write(STATUS * 400)  # and never read the answers
    time.sleep(1.0)
    took, st = host.status()
    worst = max(host.status()[0] for _ in range(5))
    serial = st["serial"]
    print(
        f"\ncontrol STATUS after 400 unread host requests: {took * 1000:.0f} ms "
        f"(worst of 5 more: {worst * 1000:.0f} ms); replies dropped so far: "
        f"{serial['replies_dropped']}"
    )
    deadline = time.monotonic() + 30
    while host.status()[1]["serial"]["requests"] < 401 and time.monotonic() < deadline:
        time.sleep(0.2)
    st = host.status()[1]["serial"]
    assert st["requests"] >= 401 and st["replies_dropped"] > 0, st
    # the host reads again: the channel answers, nothing was stuck
    assert host.drain() > 0
    assert b'"ok": true' in host.talk(STATUS)


def test_a_request_flood_keeps_memory_bounded(host_factory) -> None:
    host = host_factory()
    host.talk(STATUS)
    base = rss_kib(host.proc.pid)
    # Per MiB: 10 STATUS requests, 7 lines of 64 KiB garbage, two lines over 64 KiB.
    chunk = b"[" * (1 << 19) + b"\n" + (b"y" * 65000 + b"\n") * 7 + STATUS * 10
    chunk += b"z" * ((1 << 20) - len(chunk) - 1) + b"\n"
    total, sent, stop = 110 << 20, [0], threading.Event()

    def flood() -> None:
        while sent[0] < total and not stop.is_set():
            host.write(chunk)
            sent[0] += len(chunk)

    writer = threading.Thread(target=flood, daemon=True)
    t0 = time.monotonic()
    writer.start()
    worst, peak = 0.0, base
    try:
        while writer.is_alive() and time.monotonic() - t0 < 120:
            worst = max(worst, host.status()[0])  # answers within a second, every time
            peak = max(peak, rss_kib(host.proc.pid))
            time.sleep(0.25)
    finally:
        stop.set()
    writer.join(30)
    took = time.monotonic() - t0
    hwm = rss_kib(host.proc.pid, "VmHWM")
    print(
        f"\nflood: {sent[0] / 2**20:.0f} MiB in {took:.1f} s ({sent[0] / 2**20 / took:.0f} "
        f"MiB/s); RSS {base / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB sampled, "
        f"high-water {hwm / 1024:.1f} MiB; slowest control STATUS {worst * 1000:.0f} ms"
    )
    assert sent[0] >= 100 << 20, f"only {sent[0] >> 20} MiB got in within 120 s"
    assert hwm - base < 40 << 10, f"RSS grew {(hwm - base) >> 10} MiB during the flood"
    host.drain()
    assert b'"ok": true' in host.talk(STATUS)


def test_5000_brackets_get_an_error_and_the_channel_answers_after(host_factory) -> None:
    host = host_factory()
    reply = host.talk(b"[" * 5000 + b"\n")
    assert b'"ok": false' in reply and b"nested too deeply" in reply
    assert b'"ok": true' in host.talk(STATUS)
    long = host.talk(b'{"cmd": "status", "args": {"pad": "' + b"p" * (100 << 10) + b'"}}\n')
    assert b"longer than 65536" in long
    assert b'"ok": true' in host.talk(STATUS)
    st = host.status()[1]["serial"]
    assert st["restarts"] == 0 and st["overlong_lines"] == 1


def test_the_host_cannot_keep_an_unlock_open(host_factory) -> None:
    host = host_factory("[lock]\nrelock_after = 3\n")
    assert host.cli("unlock")["ok"]
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.5:  # host software busy the whole time
        assert b'"ok": true' in host.talk(b'{"cmd": "restore"}\n')
        time.sleep(0.3)
    time.sleep(max(0.0, t0 + 4.2 - time.monotonic()))  # the deadline the person set, + a tick
    assert host.status()[1]["mode"] == "locked"
    refused = host.talk(b'{"cmd": "save"}\n')
    assert b'"ok": false' in refused and b"LOCKED" in refused


def test_one_unlock_is_one_save(host_factory) -> None:
    host = host_factory()
    assert host.cli("unlock")["ok"]
    assert b'"ok": true' in host.talk(b'{"cmd": "save"}\n')
    assert host.status()[1]["mode"] == "locked"
    again = host.talk(b'{"cmd": "save"}\n')
    assert b'"ok": false' in again and b"LOCKED" in again
