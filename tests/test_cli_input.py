"""Plain input and plain errors, as a user types the commands: sizes, paths, sockets, --json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.sizes import SizeError, parse_size
from tests.test_daemon_support import Served, env, qemu_io

SAVEPOINT = str(Path(sys.executable).parent / "savepoint")


def sp(*argv: str, e: dict | None = None, prefix: tuple = (), timeout: float = 60):
    return subprocess.run(
        [*prefix, SAVEPOINT, *argv],
        capture_output=True,
        text=True,
        env=e or env(),
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "text,value",
    [
        ("1G", 1 << 30),
        ("512M", 512 << 20),
        ("4k", 4096),
        ("4KiB", 4096),
        ("2TiB", 2 << 40),
        ("65536", 65536),
        ("512B", 512),
        (" 2 g ", 2 << 30),
        ("1.5G", 3 << 29),
        ("1.5 GiB", 3 << 29),
    ],
)
def test_sizes_are_binary(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text,words",
    [
        ("8GB", "ambiguous"),
        ("1TB", "1000000000000 bytes for decimal"),
        ("0", "zero"),
        ("-5G", "negative"),
        ("1.3", "whole number"),
        ("lots", "not a size"),
        ("5X", "not a size"),
    ],
)
def test_bad_sizes_say_why(text, words):
    with pytest.raises(SizeError, match=words):
        parse_size(text)


@pytest.mark.parametrize(
    "size,words",
    [
        ("-5G", "negative"),
        ("0", "zero"),
        ("8GB", "ambiguous"),
        ("1000T", "more than the file system"),
    ],
)
def test_init_refuses_bad_sizes_and_creates_nothing(tmp_path, size, words):
    target = tmp_path / "disk.img"
    proc = sp("init", str(target), "--size", size)
    assert proc.returncode != 0 and words in proc.stderr, proc.stderr
    assert "expected one argument" not in proc.stderr and "Errno" not in proc.stderr
    assert not target.exists()


def test_serve_refuses_an_impossible_size_and_leaves_no_file(tmp_path):
    target = tmp_path / "disk.img"
    d = tmp_path / "s"
    proc = sp(
        "serve",
        str(target),
        "--size",
        "1000T",
        "--socket",
        f"{d}/n.sock",
        "--control",
        f"{d}/c.sock",
    )
    assert proc.returncode == 1 and "choose a smaller --size" in proc.stderr
    assert not target.exists()


def test_os_errors_name_the_path_and_the_way_out(tmp_path):
    proc = sp("init", str(tmp_path), "--size", "1G")
    assert (
        proc.returncode == 1 and f"{tmp_path}: Is a directory; give a file inside it" in proc.stderr
    )
    locked = tmp_path / "immutable.img"
    locked.write_bytes(b"")
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0:
        try:
            proc = sp("init", str(locked), "--size", "1G", "--force")
            assert (
                "immutable.img: Operation not permitted; check for an immutable file" in proc.stderr
            )
        finally:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs -o ro none {ro} && {SAVEPOINT} init {ro}/x.img --size 1G",
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert "x.img: Read-only file system; remount it read-write" in proc.stderr
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o755)
    proc = sp(
        "init",
        f"{private}/x.img",
        "--size",
        "1G",
        prefix=("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"),
    )
    assert "Permission denied; run it as a user who may write there" in proc.stderr
    proc = sp("init", f"{tmp_path}/nofolder/x.img", "--size", "1G")
    assert "the folder does not exist: create it (mkdir -p" in proc.stderr


def test_block_device_sizes_are_in_human_units(tmp_path):
    backing = tmp_path / "dev.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
    )
    if loop.returncode != 0:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    try:
        proc = sp("init", dev, "--size", "1G")
        assert proc.returncode == 1 and f"{dev} holds 16.0 MiB; a 1.0 GiB disk needs" in proc.stderr
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_second_serve_on_the_default_sockets_names_the_flags(tmp_path):
    """As an ordinary user, so the default sockets live in a runtime dir of this test's own."""
    work = Path(tempfile_dir())
    try:
        e = env()
        e["XDG_RUNTIME_DIR"] = str(work / "run")
        (work / "run").mkdir(mode=0o700)
        shutil.chown(work / "run", "nobody")
        as_nobody = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
        first = subprocess.Popen(
            [*as_nobody, SAVEPOINT, "serve", str(work / "a.img"), "--size", "64M"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=e,
        )
        try:
            assert first.stdout is not None
            while not (line := first.stdout.readline()).startswith("Stop with"):
                assert line, first.stderr.read() if first.stderr else "serve exited"
            proc = sp("serve", str(work / "b.img"), "--size", "64M", e=e, prefix=as_nobody)
            assert proc.returncode == 1 and "already serving" in proc.stderr
            assert "--socket" in proc.stderr and "--control" in proc.stderr
            assert not (work / "b.img").exists()
        finally:
            first.terminate()
            first.communicate(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tempfile_dir() -> str:
    import tempfile

    d = tempfile.mkdtemp(prefix="sp-", dir="/tmp")
    os.chmod(d, 0o777)
    return d


@pytest.fixture
def served(tmp_path):
    s = Served(str(tmp_path / "disk.img"))
    yield s
    s.cleanup()


def test_json_errors_are_json_on_stdout(tmp_path):
    proc = sp("status", "--json", "--control", str(tmp_path / "none.sock"))
    assert proc.returncode == 1
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False and "no savepoint daemon" in reply["reason"]


def test_save_reports_the_epoch_history_lists_and_says_when_nothing_was_saved(served):
    qemu_io(served.uri, "write -P 5 0 8k")
    out = sp("save", "--control", served.control).stdout
    hist = json.loads(sp("history", "--json", "--control", served.control).stdout)
    epoch = hist["data"]["history"][-1]["epoch"]
    assert out.startswith(f"SAVE done: epoch {epoch}, 2 units (8.0 KiB) kept")
    again = sp("save", "--control", served.control).stdout
    assert "nothing to save" in again and "saved state is unchanged" in again


def test_status_after_lock_does_not_contradict_itself(served):
    assert sp("lock", "--control", served.control).returncode == 0
    out = sp("status", "--control", served.control).stdout
    assert "LOCKED (SAVE refused until `savepoint unlock`" in out
    assert "LOCKED (lock mode off)" not in out


def test_inspect_check_on_a_fresh_store_says_b_is_not_written_yet(tmp_path):
    target = str(tmp_path / "disk.img")
    assert sp("init", target, "--size", "16M").returncode == 0
    out = sp("inspect", target, "--check").stdout
    assert "superblock B: not written yet" in out and "no Savepoint magic" not in out
    assert out.rstrip().endswith("check: OK")


def test_progress_stays_quiet_without_a_terminal(tmp_path):
    proc = sp("init", str(tmp_path / "d.img"), "--size", "16M")
    assert proc.returncode == 0 and proc.stderr == ""
    start = time.monotonic()
    assert sp("inspect", str(tmp_path / "d.img"), "--check").stderr == ""
    assert time.monotonic() - start < 30
