"""A SAVE while the host has the disk mounted and is copying files (docs/controls.md, "Saving
while the disk is mounted"): with [save] settle the saved filesystem is clean and holds every
file copied before the SAVE; without it, how often it is not (printed, not asserted); a host
that never stops writing gets a SAVE after max_wait, marked busy.

The host side mounts vfat with `flush` (what desktop Linux does for removable FAT disks),
ext4 with `commit=1`, and writes back dirty pages after 0.5 s instead of 30 s: the appliance
can wait for writes it sees, not for writes the host keeps in its own cache (that is
`savepoint-host save`'s job).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.inside.appliance_vm import (
    RESULTS,
    Appliance,
    digest,
    open_direct,
    read_direct,
    sh,
    write_direct,
)

TRIALS = int(os.environ.get("SAVEPOINT_LAB_BUSY_TRIALS", "2"))
SIZE = "48M"  # FAT32 with 512-byte clusters needs 32 MiB and more
SETTLED = "[save]\nsettle = 2\nmax_wait = 40\n"
UNSETTLED = "[save]\nsettle = 0\n"
FS = {
    "vfat": ("mkfs.vfat -F 32 -s 1 -n SAVEPOINT {dev}", "-t vfat -o flush,noatime"),
    # the journal commits every `commit` seconds (5 by default): a settle shorter than that
    # can fall between a file's data and its metadata, so the host commits each second here
    "ext4": ("mkfs.ext4 -q -F -L savepoint {dev}", "-t ext4 -o noatime,commit=1"),
}
# fsck.vfat -n on the image of a mounted FAT volume: these lines are the dirty bit, not damage
# (FAT32 keeps it at boot sector offset 65, so the backup boot sector differs there alone)
FAT_BENIGN = re.compile(
    r"^(fsck\.fat |(0x41: )?Dirty bit is set|\s*Automatically removing dirty bit|Leaving "
    r"filesystem unchanged|.*: \d+ files, \d+/\d+ clusters|There are differences between "
    r"boot sector and its backup|This is mostly harmless|\s+65:01/00$|\s+Not automatically "
    r"fixing this)"
)


def report(line: str) -> None:
    print(line)
    with open(RESULTS / "busy-host.txt", "a") as f:
        f.write(line + "\n")


@contextlib.contextmanager
def quick_host_writeback() -> Iterator[None]:
    knobs = {
        k: Path(f"/proc/sys/vm/{k}")
        for k in ("dirty_expire_centisecs", "dirty_writeback_centisecs")
    }
    old = {k: p.read_text() for k, p in knobs.items()}
    for p in knobs.values():
        p.write_text("50")
    try:
        yield
    finally:
        for k, p in knobs.items():
            p.write_text(old[k])


class Writer(threading.Thread):
    """Copies files in bursts with pauses, never syncing; remembers when each copy finished."""

    def __init__(self, root: Path, bursts: int = 3, files: int = 5, pause: float = 6.0) -> None:
        super().__init__(daemon=True)
        self.root, self.bursts, self.files, self.pause = root, bursts, files, pause
        self.finished: list[tuple[str, str, float]] = []  # (path, sha256, wall time)
        self.burst_started = [threading.Event() for _ in range(bursts)]
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for b in range(self.bursts):
                self.burst_started[b].set()
                for f in range(self.files):
                    data = os.urandom(150_000 + 97_000 * f)
                    name = f"burst{b}/file{f}.bin"
                    (self.root / name).parent.mkdir(exist_ok=True)
                    (self.root / name).write_bytes(data)  # open, write, close: no fsync
                    self.finished.append((name, digest(data), time.time()))
                time.sleep(self.pause)
        except BaseException as e:  # reported by the scenario
            self.error = e


def fsck(kind: str, image: Path) -> list[str]:
    """What fsck reports about the saved image beyond a mounted volume's dirty bit."""
    if kind == "vfat":
        out = sh(f"fsck.vfat -n {image}", check=False)
        return [
            ln
            for ln in (out.stdout + out.stderr).splitlines()
            if ln.strip() and not FAT_BENIGN.match(ln)
        ]
    sh(f"e2fsck -E journal_only -y {image}", check=False)  # the next mount replays it too
    out = sh(f"e2fsck -fn {image}", check=False)
    return [] if out.returncode == 0 else (out.stdout + out.stderr).splitlines()[1:]


def missing_files(
    kind: str, image: Path, where: Path, files: list[tuple[str, str, float]]
) -> list[str]:
    where.mkdir(exist_ok=True)
    opts = "ro,noload" if kind == "ext4" else "ro"
    sh(f"mount -t {kind} -o loop,{opts} {image} {where}")
    try:
        bad = []
        for name, want, _ in files:
            path = where / name
            if not path.is_file() or digest(path.read_bytes()) != want:
                bad.append(name)
        return bad
    finally:
        sh(f"umount {where}")


def trial(app: Appliance, dev: str, kind: str, tmp: Path, n: int) -> dict[str, Any]:
    """mkfs, mount, copy in bursts, SAVE in the middle of the second burst, then look at the
    saved image (after RESTORE, read back from the USB disk)."""
    mkfs, mount_opts = FS[kind]
    sh(mkfs.format(dev=dev))
    mnt = tmp / f"host{n}"
    mnt.mkdir()
    sh(f"mount {mount_opts} {dev} {mnt}")
    writer = Writer(mnt)
    try:
        writer.start()
        assert writer.burst_started[1].wait(120), "the writer never reached its second burst"
        time.sleep(0.3)
        sent = time.monotonic()
        save = app.request("save")
        latency = time.monotonic() - sent
        writer.join(300)
        assert writer.error is None, writer.error
    finally:
        sh(f"umount {mnt}", check=False)  # the rest reaches the disk, unsaved
    assert save["ok"], save
    assert app.request("restore")["ok"]  # back to the saved image
    image = tmp / f"saved{n}.img"
    image.write_bytes(read_direct(dev))
    # Files finished while the host was already quiet were still in its own cache (no write
    # reached the disk then): only `savepoint-host save` or a writing-through host saves them.
    went_quiet = save["data"]["time"] - (save["data"]["quiet"] or 0)
    before = [f for f in writer.finished if f[2] < went_quiet]
    in_cache = sum(went_quiet <= f[2] < save["data"]["time"] for f in writer.finished)
    problems = fsck(kind, image)
    return {
        "latency": latency,
        "record": save["data"],
        "problems": problems,
        "missing": missing_files(kind, image, tmp / f"saved{n}", before),
        "before": len(before),
        "copied": len(writer.finished),
        "in_cache": in_cache,
    }


def run_trials(app: Appliance, tmp: Path, kind: str, config: str) -> list[dict[str, Any]]:
    sh("modprobe loop; modprobe ext4; modprobe vfat", check=False)
    dev = app.start(lock=False, extra=config)
    app.cli("unlock", check=False)  # lock is off here; with a lock, one unlock = one SAVE
    with quick_host_writeback():
        return [trial(app, dev, kind, tmp, n) for n in range(TRIALS)]


@pytest.mark.parametrize("kind", ["vfat", "ext4"])
def test_busy_host_settled_save_is_clean(appliance: Appliance, tmp_path: Path, kind: str) -> None:
    appliance.size = SIZE
    results = run_trials(appliance, tmp_path, kind, SETTLED)
    for r in results:
        rec = r["record"]
        report(
            f"busy host, settle 2 s, {kind}: SAVE latency {r['latency']:.1f} s (waited "
            f"{rec['waited']:.1f} s, host quiet {rec['quiet']} s), {r['before']} of "
            f"{r['copied']} files copied before the host went quiet, all saved; "
            f"{r['in_cache']} finished while it was quiet; fsck: "
            f"{'clean' if not r['problems'] else r['problems']}"
        )
    for r in results:
        assert not r["problems"], f"the saved {kind} image needs repair: {r['problems']}"
        assert not r["missing"], f"files copied before the SAVE are not in it: {r['missing']}"
        assert r["record"]["quiet"] >= 2 and not r["record"]["host_busy"], r["record"]
    assert any(r["record"]["waited"] > 0.5 for r in results), "no SAVE waited for the host"


@pytest.mark.parametrize("kind", ["vfat", "ext4"])
def test_busy_host_unsettled_dirty_rate(appliance: Appliance, tmp_path: Path, kind: str) -> None:
    """settle = 0: what the wait buys (printed; the count of dirty images is not asserted)."""
    appliance.size = SIZE
    results = run_trials(appliance, tmp_path, kind, UNSETTLED)
    dirty = sum(bool(r["problems"]) for r in results)
    lost = sum(bool(r["missing"]) for r in results)
    report(
        f"busy host, settle 0, {kind}: {dirty} of {len(results)} saved images need repair, "
        f"{lost} miss files copied before the SAVE; latencies "
        + ", ".join(f"{r['latency']:.1f} s" for r in results)
    )
    for r in results:
        if r["problems"]:
            report("  fsck: " + "; ".join(r["problems"][:6]))
        # the record tells the user this SAVE did not wait: the host was writing
        assert r["record"]["quiet"] is not None and r["record"]["waited"] < 1, r["record"]


def test_busy_host_never_stops_writing(appliance: Appliance) -> None:
    """max_wait passes: SAVE commits anyway, marked busy; a second SAVE or --now hurries it."""
    dev = appliance.start(lock=False, extra="[save]\nsettle = 2\nmax_wait = 6\n")
    fd = open_direct(dev)
    stop = threading.Event()

    def keep_writing() -> None:
        block = os.urandom(4096)
        while not stop.is_set():
            write_direct(fd, 8 << 20, block)  # WRITE(10) every 0.2 s, no cache flush
            time.sleep(0.2)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        sent = time.monotonic()
        busy = appliance.request("save")
        busy_latency = time.monotonic() - sent
        assert busy["ok"], busy
        assert busy["data"]["host_busy"] is True and busy["data"]["quiet"] < 2, busy["data"]
        assert busy_latency >= 5.5, f"the SAVE did not wait for the host ({busy_latency:.1f} s)"

        first: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: first.update(appliance.request("save")))
        waiter.start()
        time.sleep(1.5)
        watching = appliance.status()
        second = appliance.request("save")  # the second press
        waiter.join(60)
        assert watching.get("saving") == "waiting for the host", watching.get("saving")
        assert second["ok"] and second["data"].get("hurried"), second
        assert first["ok"] and first["data"]["forced"] is True, first
        assert first["data"]["waited"] < 5, first["data"]

        now = appliance.cli("save", "--now").stdout
        assert "forced" in now, now
    finally:
        stop.set()
        writer.join(10)
        os.close(fd)
    history = appliance.cli("history").stdout
    assert "BUSY (saved anyway)" in history and "forced" in history, history
    report(
        f"host never quiet: SAVE committed after {busy_latency:.1f} s (max_wait 6 s), "
        f"marked busy; a second press committed after {first['data']['waited']:.1f} s"
    )


class Served(Appliance):
    """Off a Pi: `savepoint serve`, with the kernel's NBD client as the host (/dev/nbd1)."""

    def start(self, timeout: float = 60.0, **config: Any) -> str:
        import subprocess
        import sys

        log = open(RESULTS / "daemon-serve-busy-host.log", "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance.cli",
                "serve",
                str(self.store),
                "--size",
                SIZE,
                "--socket",
                self.nbd_socket,
                "--control",
                self.control,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not Path(self.control).exists() or not Path(self.nbd_socket).exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        sh(f"nbd-client -unix {self.nbd_socket} /dev/nbd1 -N savepoint -b 512")
        return "/dev/nbd1"

    def close(self) -> None:
        sh("nbd-client -d /dev/nbd1", check=False)
        self.kill(15)


def test_busy_host_off_a_pi_serve_vfat(tmp_path: Path) -> None:
    """The same trial off a Pi: vfat on the kernel NBD client mounted on `savepoint serve`
    (its default settle of 2 s); the NBD client's writes are the host's writes."""
    served = Served(tmp_path)
    try:
        dev = served.start()
        with quick_host_writeback():
            results = [trial(served, dev, "vfat", tmp_path, n) for n in range(TRIALS)]
    finally:
        served.close()
    for r in results:
        rec = r["record"]
        report(
            f"busy host off a Pi (serve, kernel NBD client), settle 2 s, vfat: SAVE latency "
            f"{r['latency']:.1f} s (waited {rec['waited']:.1f} s), fsck: "
            f"{'clean' if not r['problems'] else r['problems']}"
        )
    for r in results:
        assert not r["problems"] and not r["missing"], r
        assert r["record"]["quiet"] >= 2, r["record"]


def test_busy_host_agent_flushes_before_save(appliance: Appliance, tmp_path: Path) -> None:
    """`savepoint-host save` on the host: syncfs of the mounted Savepoint volume and an fsync
    of the disk (SYNCHRONIZE CACHE), then SAVE: recorded as synced, nothing missing."""
    import json
    import subprocess
    import sys

    dev = appliance.start(lock=True)  # the real default: one unlock, one SAVE
    sh(f"mkfs.vfat -n SAVEPOINT {dev}")
    mnt = tmp_path / "host"
    mnt.mkdir()
    sh(f"mount -t vfat -o noatime {dev} {mnt}")  # no `flush`: the host keeps writes 30 s
    data = os.urandom(700_000)
    (mnt / "late.bin").write_bytes(data)  # in the host's page cache only
    appliance.cli("unlock")
    done = subprocess.run(
        [sys.executable, "-m", "appliance.usb.host_client", "save", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"flushed {mnt}" in done.stderr and f"flushed {dev}" in done.stderr, done.stderr
    record = json.loads(done.stdout)["data"]
    sh(f"umount {mnt}")
    assert appliance.request("restore")["ok"]
    image = tmp_path / "saved.img"
    image.write_bytes(read_direct(dev))
    assert fsck("vfat", image) == []
    assert missing_files("vfat", image, tmp_path / "saved", [("late.bin", digest(data), 0)]) == []
    assert record["host_synced"] is True and record["source"] == "host", record
    report(
        f"savepoint-host save: flushed the mounted volume and the disk, SAVE recorded "
        f"synced, quiet {record['quiet']} s, waited {record['waited']:.1f} s"
    )
