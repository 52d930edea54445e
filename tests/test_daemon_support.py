"""Helpers for the daemon/CLI tests: run `savepoint` as a real subprocess (no tests here)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAVEPOINT = [sys.executable, "-m", "appliance.cli"]
ROOT = Path(__file__).resolve().parent.parent


def short_dir() -> str:
    """Unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer."""
    return tempfile.mkdtemp(prefix="sp-", dir="/tmp")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e.pop("SAVEPOINT_CONTROL", None)
    e.pop("NOTIFY_SOCKET", None)
    return e


def cli(
    *args: str,
    control: str,
    check: bool = True,
    timeout: float = 60,
    stdin: int | None = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*SAVEPOINT, *args, "--control", control],
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
        stdin=stdin,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"savepoint {' '.join(args)} failed: {proc.stderr}")
    return proc


def request(control: str, cmd: str, **args: object) -> dict:
    """One request over the control socket, in process (a CLI subprocess costs a second)."""
    from appliance.control.client import ControlClient, ControlError

    try:
        with ControlClient(control, timeout=60) as client:
            return client.request(cmd, args)
    except ControlError as e:
        raise AssertionError(str(e)) from None


def status(control: str) -> dict:
    reply = request(control, "status")
    assert reply["ok"], reply
    return reply["data"]


class Served:
    """`savepoint serve TARGET` in a subprocess, ready once it printed its banner."""

    def __init__(
        self, target: str, *extra: str, size: str | None = "64M", sockets: str | None = None
    ) -> None:
        self.dir = sockets or short_dir()
        self.nbd = os.path.join(self.dir, "nbd.sock")
        self.control = os.path.join(self.dir, "c.sock")
        self.uri = f"nbd+unix:///savepoint?socket={self.nbd}"
        cmd = [*SAVEPOINT, "serve", target, "--socket", self.nbd, "--control", self.control, *extra]
        if size:
            cmd += ["--size", size]
        self.log_path = os.path.join(self.dir, "stderr.log")
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env()
        )
        self.banner = self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> str:
        lines = []
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"serve exited {self.proc.wait()}: {self.stderr()}")
            lines.append(line)
            if line.startswith("Stop with Ctrl-C."):
                return "".join(lines)
        raise AssertionError(f"serve not ready after {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()

    def cleanup(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or "fail" in proc.stdout.lower() or "error" in proc.stdout.lower():
        raise AssertionError(f"qemu-io {commands}: {proc.stdout}{proc.stderr}")
    return proc


def pattern_matches(uri: str, offset: int, length: int, byte: int) -> bool:
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"read -P {byte} {offset} {length}", uri],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode == 0 and "Pattern verification failed" not in proc.stdout
