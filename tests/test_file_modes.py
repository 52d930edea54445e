"""What `savepoint serve`, `savepoint init` and the fob registry create is theirs alone
(issue 15, finding 5): the store is the whole disk, nbd.sock is raw access to it, and the
registry holds the fob keys. Each is 0600 whatever the caller's umask."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from tests.test_daemon_support import SAVEPOINT, Served, env, qemu_io


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def loose_umask(argv: list[str]) -> list[str]:
    """Run argv with umask 000: what the program creates is then exactly what it asks for."""
    return ["sh", "-c", 'umask 000 && exec "$@"', "sh", *argv]


def test_serve_creates_a_private_store_and_a_root_only_nbd_socket(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        served = Served(str(tmp_path / "disk.img"))
    finally:
        os.umask(old)
    try:
        assert mode(tmp_path / "disk.img") == 0o600
        st = os.stat(served.nbd)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        qemu_io(served.uri, "read 0 4k")  # its owner still gets in
    finally:
        served.cleanup()


def test_init_makes_the_store_file_0600_even_over_a_readable_file(tmp_path: Path) -> None:
    target = tmp_path / "old.img"
    target.write_bytes(b"")
    target.chmod(0o644)
    for path, extra in ((tmp_path / "new.img", []), (target, ["--force"])):
        res = subprocess.run(
            loose_umask([*SAVEPOINT, "init", str(path), "--size", "8M", *extra]),
            capture_output=True,
            text=True,
            env=env(),
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        assert mode(path) == 0o600, path


def test_fob_registry_and_its_new_folder_are_private(tmp_path: Path) -> None:
    from ble.keys import FobRegistry

    old = os.umask(0)
    try:
        FobRegistry(tmp_path / "state" / "fobs.json")
    finally:
        os.umask(old)
    assert mode(tmp_path / "state" / "fobs.json") == 0o600
    assert mode(tmp_path / "state") == 0o700
