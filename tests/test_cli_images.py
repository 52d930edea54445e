"""Disk images in and out, as a user types it: init --from (raw, qcow2) and export (offline and
through the daemon), checked with qemu-img-made images and checksums."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_daemon_support import Served, env, qemu_io

SAVEPOINT = str(Path(sys.executable).parent / "savepoint")


def sp(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SAVEPOINT, *argv],
        capture_output=True,
        text=True,
        env=env(),
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def make_image(path: Path, fmt: str) -> None:
    subprocess.run(
        ["qemu-img", "create", "-f", fmt, str(path), "64M"], check=True, capture_output=True
    )
    qemu_io_file(path, fmt, "write -P 0xAB 1M 2M", "write -P 0xCD 40M 64k", "write -P 1 63M 4k")


def qemu_io_file(path: Path, fmt: str, *commands: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def raw_sha(path: Path, fmt: str) -> str:
    """The guest-visible bytes of an image, whatever its format."""
    raw = path.with_suffix(".cmp")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)], check=True)
    try:
        return hashlib.sha256(raw.read_bytes()).hexdigest()
    finally:
        raw.unlink()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_init_from_image_makes_it_the_saved_state_and_export_gives_it_back(tmp_path, fmt):
    image, store, out = tmp_path / f"src.{fmt}", tmp_path / "store.img", tmp_path / "out.raw"
    make_image(image, fmt)
    proc = sp("init", str(store), "--from", str(image))
    assert proc.returncode == 0, proc.stderr
    assert "disk 64.0 MiB" in proc.stdout and "is its saved state" in proc.stdout
    assert proc.stderr == ""  # no terminal: no progress bar
    # holes stayed holes: 2 x 2.1 MiB of data at most, plus the metadata
    assert allocated(store) < 16 << 20
    hist = json.loads(sp("history", str(store), "--json").stdout)["data"]["history"]
    assert [(r["action"], r["source"]) for r in hist] == [("save", "import")]
    assert sp("export", str(store), str(out)).returncode == 0
    assert raw_sha(out, "raw") == raw_sha(image, fmt)
    assert allocated(out) < 8 << 20  # the export is sparse too
    again = sp("export", str(store), str(out))
    assert again.returncode == 1 and "--force" in again.stderr
    qcow = tmp_path / "out.qcow2"
    assert sp("export", str(store), str(qcow), "--format", "qcow2").returncode == 0
    assert raw_sha(qcow, "qcow2") == raw_sha(image, fmt)


def test_init_from_refuses_a_size_smaller_than_the_image_and_leaves_nothing(tmp_path):
    image, store = tmp_path / "src.qcow2", tmp_path / "store.img"
    make_image(image, "qcow2")
    proc = sp("init", str(store), "--from", str(image), "--size", "32M")
    assert proc.returncode == 1 and "leave --size out" in proc.stderr
    proc = sp("init", str(store), "--from", str(tmp_path / "missing.qcow2"))
    assert proc.returncode == 1 and "no such image" in proc.stderr
    assert not store.exists()


def test_export_saved_and_working_offline_and_through_the_daemon(tmp_path):
    image, store = tmp_path / "src.qcow2", tmp_path / "store.img"
    make_image(image, "qcow2")
    assert sp("init", str(store), "--from", str(image)).returncode == 0
    served = Served(str(store), size=None)
    try:
        qemu_io(served.uri, "write -P 0xEE 0 8k")  # unsaved
        refused = sp("export", str(store), str(tmp_path / "s.raw"), "--control", served.control)
        assert (
            refused.returncode == 1
            and "unsaved" in refused.stderr
            and "--working" in refused.stderr
        )
        assert not (tmp_path / "s.raw").exists()
        work = tmp_path / "w.raw"
        proc = sp("export", str(store), str(work), "--working", "--control", served.control)
        assert proc.returncode == 0, proc.stderr
        expected = subprocess.run(
            ["qemu-img", "convert", "-O", "raw", served.uri, str(tmp_path / "live.raw")], check=True
        )
        assert expected.returncode == 0
        assert (
            raw_sha(work, "raw") == raw_sha(tmp_path / "live.raw", "raw") != raw_sha(image, "qcow2")
        )
    finally:
        assert served.stop() == 0
        served.cleanup()
    saved, working = tmp_path / "saved.raw", tmp_path / "working.raw"
    assert sp("export", str(store), str(saved), "--saved").returncode == 0
    assert sp("export", str(store), str(working), "--working").returncode == 0
    assert raw_sha(saved, "raw") == raw_sha(image, "qcow2")
    assert raw_sha(working, "raw") == raw_sha(work, "raw")


def test_progress_shows_on_a_terminal_and_ends_its_line(tmp_path):
    import pty

    store = tmp_path / "store.img"
    assert sp("init", str(store), "--size", "64M").returncode == 0
    main, sub = pty.openpty()
    try:
        proc = subprocess.Popen(
            [SAVEPOINT, "export", str(store), str(tmp_path / "o.raw")],
            stdin=sub,
            stdout=sub,
            stderr=sub,
            env=env(),
        )
        os.close(sub)
        out = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(60) == 0
    finally:
        os.close(main)
    text = out.decode(errors="replace")
    assert "exporting the saved state" in text and "100%" in text
    assert "\nexported the saved state" in text.replace("\r\n", "\n")  # on its own line
