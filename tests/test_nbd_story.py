"""End to end through real clients: the SAVE/RESTORE story, a server restart, and an ext4
filesystem on nbdfuse + loop that survives SAVE, changes and RESTORE."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from appliance.nbd.server import NbdServer
from appliance.store import Store
from tests.nbd_helpers import ENV, MiB, run, serve


def qemu_io(uri: str, *cmds: str) -> str:
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    out = run(*argv, uri).stdout
    assert "verification failed" not in out.lower(), out
    return out


def test_story_save_restore_and_restart(tmp_path):
    with serve(tmp_path, size=16 * MiB) as s:
        qemu_io(s.uri, "write -P 0xaa 0 1M")  # A
        s.store.save("test")
        qemu_io(s.uri, "write -P 0xbb 512k 1M", "read -P 0xbb 512k 1M")  # B
        s.store.restore("test")
        qemu_io(s.uri, "read -P 0xaa 0 1M", "read -P 0 1M 1M")  # A again, B gone
        qemu_io(s.uri, "write -P 0xcc 4M 2M")  # C
        s.store.save("test")
        path = s.path
    store = Store.open(path)  # a new process would do exactly this
    srv = NbdServer(store, unix_path=str(tmp_path / "again.sock"))
    srv.start()
    try:
        qemu_io(srv.uris[0], "read -P 0xcc 4M 2M", "read -P 0xaa 0 1M")
        assert [h["action"] for h in store.history()] == ["save", "restore", "save"]
    finally:
        srv.stop()
        store.close()


def _free_loop() -> str:
    """A free loop device, creating device nodes if this machine has none."""
    if not os.path.exists("/dev/loop-control"):
        os.mknod("/dev/loop-control", 0o660 | 0o020000, os.makedev(10, 237))
    for _attempt in range(2):
        proc = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
        if proc.returncode == 0 and os.path.exists(proc.stdout.strip()):
            return proc.stdout.strip()
        n = int(proc.stdout.strip().removeprefix("/dev/loop") or 0) if proc.stdout else 0
        for i in range(n, n + 8):
            if not os.path.exists(f"/dev/loop{i}"):
                os.mknod(f"/dev/loop{i}", 0o660 | 0o060000, os.makedev(7, i))
    raise AssertionError("no loop device available")


class Fuse:
    """nbdfuse exposing the export as a file, with a loop device on it."""

    def __init__(self, tmp_path: Path, uri: str) -> None:
        self.dir = tmp_path / "fuse"
        self.dir.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(["nbdfuse", str(self.dir / "nbd"), uri], env=ENV)
        deadline = time.monotonic() + 20
        while not (self.dir / "nbd").exists():
            assert time.monotonic() < deadline and self.proc.poll() is None, "nbdfuse failed"
            time.sleep(0.05)
        self.loop = run(
            "losetup", "--direct-io=on", "--show", _free_loop(), str(self.dir / "nbd")
        ).stdout.strip()

    def close(self) -> None:
        run("losetup", "-d", self.loop)
        run("fusermount3", "-u", str(self.dir))
        self.proc.wait(20)


def tree_sums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "lost+found" not in p.parts
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="mount and losetup need root (CI runs as root)")
def test_ext4_on_nbdfuse_survives_save_change_restore(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with serve(tmp_path, size=64 * MiB) as s:
        fuse = Fuse(tmp_path, s.uri)
        try:
            run("mkfs.ext4", "-q", fuse.loop)
            run("mount", fuse.loop, str(mnt))
            files = mnt / "files"
            files.mkdir()
            for i in range(20):
                (files / f"f{i}.bin").write_bytes(os.urandom(37_000 * (i + 1)))
            run("cp", "-r", str(Path(__file__).parent.parent / "appliance"), str(files))
            run("sync", "-f", str(mnt))
            saved = tree_sums(files)
            s.store.save("test")
            for i in range(0, 20, 2):  # change, delete and add files
                (files / f"f{i}.bin").write_bytes(b"changed" * 9999)
            (files / "f1.bin").unlink()
            (files / "new.bin").write_bytes(os.urandom(3 * MiB))
            run("sync", "-f", str(mnt))
            assert tree_sums(files) != saved
            run("umount", str(mnt))
            fuse.close()
            s.store.restore("test")
            fuse = Fuse(tmp_path, s.uri)
            run("mount", fuse.loop, str(mnt))
            assert tree_sums(files) == saved
            run("umount", str(mnt))
            fsck = run("e2fsck", "-fn", fuse.loop, check=False)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
            fuse.close()
