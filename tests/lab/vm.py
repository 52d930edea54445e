"""Boot the lab VM: Debian's kernel, a busybox initramfs, the host root over 9p, run a job.

One boot runs one shell job (normally pytest on tests/lab/inside) and powers off. The job's
output, its exit code, the console log and anything the job writes land in the results
directory, which the guest sees read-write at /lab-results.

By hand: `python -m tests.lab.vm -- -k vfat` runs the inside scenarios matching "vfat";
`python -m tests.lab.vm --job 'lsmod; ls /dev'` runs any shell command in the VM.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.lab.bluez import fetch_bluez
from tests.lab.kernel import Kernel, LabSetupError, fetch_kernel, module_closure

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".lab-cache"
BOOT_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
# The Pi side (gadget, NBD) and the host side (usb-storage, cdc-acm) of one kernel.
LAB_MODULES = [
    "configfs", "dummy_hcd", "libcomposite", "usb_f_mass_storage", "usb_f_acm",
    "usb-storage", "sd_mod", "nbd", "cdc_acm", "sg",
    "bluetooth", "hci_vhci",  # the BLE scenario: bumble controllers as hci0/hci1
]  # fmt: skip


@dataclass
class RunResult:
    returncode: int  # the job's exit code; -1 when the VM died or timed out before it ended
    seconds: float
    accel: str
    results: Path

    def log(self, name: str) -> str:
        path = self.results / name
        return path.read_text(errors="replace") if path.exists() else ""


def build_initramfs(kernel: Kernel, dest: Path) -> Path:
    """A newc cpio with busybox, the modules needed to reach the 9p root, and our /init."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise LabSetupError("busybox not found: apt-get install busybox-static")
    mods = module_closure(kernel, BOOT_MODULES)
    archive = _Cpio()
    for d in ("bin", "dev", "lib"):
        archive.add_dir(d)
    archive.add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    archive.add_file("init", (Path(__file__).parent / "guest_init.sh").read_bytes(), 0o755)
    for rel in mods:
        archive.add_file(Path(rel).name, (kernel.modules / rel).read_bytes(), 0o644)
    archive.add_file("modules.load", "".join(Path(m).name + "\n" for m in mods).encode(), 0o644)
    dest.write_bytes(archive.finish())
    return dest


class _Cpio:
    """Just enough of the newc format for an initramfs (the kernel accepts it uncompressed)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        raw = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        self.out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        self.out.write(b"\0" * (-self.out.tell() % 4) + data)
        self.out.write(b"\0" * (-self.out.tell() % 4))
        self.ino += 1

    def add_dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"")

    def add_file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self.out.getvalue()


def kvm_usable() -> bool:
    """/dev/kvm can exist without the CPU virtualisation a guest needs (nested machines)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags


def qemu_command(kernel: Kernel, initrd: Path, results: Path, accel: str) -> list[str]:
    share = "security_model=none,multidevs=remap"
    return [
        "qemu-system-x86_64", "-accel", accel, "-m", "2048", "-smp", "2",
        "-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none",
        "-serial", f"file:{results / 'console.log'}",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 loglevel=4 rdinit=/init panic=-1 tsc=unstable",
        "-virtfs", f"local,path=/,mount_tag=hostroot,{share},readonly=on",
        "-virtfs", f"local,path={results},mount_tag=results,{share}",
    ]  # fmt: skip


def job_prelude(modules: list[str] = LAB_MODULES) -> str:
    """Guest shell that loads the lab modules and enters the repository."""
    return f"""set -u
ln -sf /bin/busybox /sbin/modprobe 2>/dev/null
mkdir -p /lib/modules && ln -sfn {CACHE}/kernel/$(uname -r)/lib/modules/$(uname -r) \\
    /lib/modules/$(uname -r)
for m in {" ".join(modules)}; do busybox modprobe $m || echo "modprobe $m failed"; done
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
echo 30 > /proc/sys/kernel/hung_task_timeout_secs  # stuck I/O shows in console.log early
(sleep 420; dmesg > /lab-results/dmesg-420s.log) &
cd {REPO}
export SAVEPOINT_LAB_GUEST=1 PYTHONDONTWRITEBYTECODE=1 PATH=/usr/sbin:/usr/bin:/sbin:/bin
echo "guest: $(uname -r), $(nproc) cpus, modules loaded at $(cut -d' ' -f1 /proc/uptime) s"
"""


def job_script(pytest_args: list[str]) -> str:
    """The shell the guest runs: the prelude, then pytest on the inside scenarios."""
    quoted = " ".join(shlex.quote(a) for a in pytest_args)
    return (
        job_prelude()
        + f"""{REPO}/.venv/bin/python -m pytest -p no:cacheprovider \\
    -o addopts= -o faulthandler_timeout=300 -rA --strict-markers \\
    --junitxml=/lab-results/junit.xml {quoted}
rc=$?
dmesg > /lab-results/dmesg.log
echo "guest: pytest done at $(cut -d' ' -f1 /proc/uptime) s"
exit $rc
"""
    )


def run(job: str, results: Path, timeout: float = 900) -> RunResult:
    """Boot once, run `job` (shell text) as root inside, wait for power-off."""
    t0 = time.monotonic()
    kernel = fetch_kernel(CACHE)
    fetch_bluez(CACHE)  # bluetoothd for the BLE scenario; the guest cannot download
    if shutil.which("qemu-system-x86_64") is None:
        raise LabSetupError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    results.mkdir(parents=True)
    initrd = build_initramfs(kernel, results / "initramfs.cpio")
    (results / "job.sh").write_text(job)
    accel = os.environ.get("SAVEPOINT_LAB_ACCEL") or ("kvm" if kvm_usable() else "tcg")
    started = time.monotonic()
    print(
        f"lab: kernel {kernel.version} and initramfs ready in {started - t0:.1f} s; "
        f"booting under {accel}",
        flush=True,
    )
    with open(results / "qemu.log", "w") as qlog:
        proc = subprocess.Popen(
            qemu_command(kernel, initrd, results, accel),
            stdout=qlog,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - started
    rc_file = results / "job.rc"
    rc = int(rc_file.read_text().strip() or -1) if rc_file.exists() else -1
    return RunResult(rc, seconds, accel, results)


def results_dir() -> Path:
    """A fresh directory per run (several sessions may run the lab at once); `last` points
    at the newest."""
    base = CACHE / "results"
    base.mkdir(parents=True, exist_ok=True)
    path = base / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
    for old in sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink())[:-4]:
        shutil.rmtree(old, ignore_errors=True)  # keep the last few runs
    last = base / "last"
    with contextlib.suppress(FileNotFoundError):
        last.unlink()
    last.symlink_to(path.name)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the Savepoint lab VM once.")
    parser.add_argument("--job", help="shell command to run instead of the inside scenarios")
    parser.add_argument(
        "--results",
        help="results directory (default: a new one under .lab-cache/results, linked as `last`)",
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    if args.job:
        job = job_prelude() + args.job + "\n"
    else:
        job = job_script(["tests/lab/inside", *args.pytest_args])
    result = run(job, Path(args.results) if args.results else results_dir())
    print(result.log("job.log"))
    print(
        f"lab: exit {result.returncode} in {result.seconds:.1f} s ({result.accel}); "
        f"logs in {result.results}"
    )
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
