"""Debian's stock kernel for the lab VM, fetched once into the cache directory.

`apt-get download linux-image-amd64` gives only the meta package; its Depends names the real
versioned package (linux-image-6.1.0-NN-amd64), which is downloaded and unpacked with
`dpkg -x`. `dpkg -x` runs no maintainer scripts, so modules.dep is built with `depmod -b`
(busybox's depmod when kmod is not installed: busybox modprobe reads it inside the VM).
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

META_PACKAGE = "linux-image-amd64"


@dataclass(frozen=True)
class Kernel:
    version: str  # e.g. 6.1.0-56-amd64
    root: Path  # the unpacked package: boot/ and lib/modules/<version>/

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version


class LabSetupError(RuntimeError):
    """The lab cannot be prepared on this machine; the message says what to install or fix."""


def fetch_kernel(cache: Path) -> Kernel:
    """Return the cached kernel, downloading and unpacking it on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "kernel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest sessions must not unpack at once
        version = _wanted_version(cache)
        kernel = Kernel(version, cache / "kernel" / version)
        if not (kernel.root / ".ready").exists():
            _unpack(cache, kernel)
        return kernel


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise LabSetupError(f"{cmd[0]} not found: install it (see .ci/apt-packages.txt)") from e
    if done.returncode != 0:
        raise LabSetupError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def _wanted_version(cache: Path) -> str:
    """Ask apt for the meta package and follow its dependency; offline, use what is cached."""
    downloads = cache / "debs"
    downloads.mkdir(exist_ok=True)
    try:
        _run(["apt-get", "download", META_PACKAGE], downloads)
    except LabSetupError:
        ready = sorted(glob.glob(str(cache / "kernel" / "*" / ".ready")))
        if ready:  # no registry reachable: the last unpacked kernel will do
            return Path(ready[-1]).parent.name
        raise
    metas = sorted(downloads.glob(f"{META_PACKAGE}_*.deb"), key=os.path.getmtime)
    depends = _run(["dpkg-deb", "-f", str(metas[-1]), "Depends"], downloads)
    match = re.search(r"linux-image-(\d[^\s,(]*)", depends)
    if not match:
        raise LabSetupError(f"no kernel package in {META_PACKAGE}'s Depends: {depends}")
    return match.group(1)


def _unpack(cache: Path, kernel: Kernel) -> None:
    downloads = cache / "debs"
    package = f"linux-image-{kernel.version}"
    debs = list(downloads.glob(f"{package}_*.deb"))
    if not debs:
        _run(["apt-get", "download", package], downloads)
        debs = list(downloads.glob(f"{package}_*.deb"))
    shutil.rmtree(kernel.root, ignore_errors=True)
    kernel.root.mkdir(parents=True)
    _run(["dpkg", "-x", str(debs[0]), str(kernel.root)], downloads)
    depmod = shutil.which("depmod") or shutil.which("/sbin/depmod")
    cmd = [depmod] if depmod else ["busybox", "depmod"]
    _run([*cmd, "-b", str(kernel.root), kernel.version], downloads)
    for old in downloads.glob("linux-image-*.deb"):  # unpacked now; 70 MB each
        if old.name.startswith(package):
            old.unlink()
    (kernel.root / ".ready").write_text(kernel.version + "\n")


def module_closure(kernel: Kernel, names: list[str]) -> list[str]:
    """Relative paths of the named modules and everything they depend on, load order first."""
    deps: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    by_name = {_module_name(p): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            raise LabSetupError(f"module {name} is not in kernel {kernel.version}")
        visit(by_name[key])
    return order


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")
