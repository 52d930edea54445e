"""systemd/savepoint.service's sandbox, rebuilt without systemd as PID 1 (the lab VM's init is
a shell). `command(unit, argv)` is the command line that runs argv inside it.

Stage 1 (this module as a script, still root with every capability): a private mount
namespace made as ProtectSystem=strict, ReadWritePaths, StateDirectory, RuntimeDirectory,
ProtectHome, PrivateTmp, ProtectKernelTunables, ProtectControlGroups and ProtectProc=invisible
make it; UMask; WorkingDirectory. It execs setpriv (CapabilityBoundingSet, NoNewPrivileges,
Group), which execs stage 2: the seccomp filters systemd 252 builds for SystemCallFilter (with
SystemCallErrorNumber), SystemCallArchitectures, RestrictAddressFamilies, RestrictNamespaces,
MemoryDenyWriteExecute and RestrictRealtime, loaded with libseccomp, then exec of argv.

Not rebuilt (say so when asked, `NOT_REPRODUCED`): they are cgroup BPF programs or namespaces
that need systemd's own cgroup or a new UTS namespace.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

NOT_REPRODUCED = (
    "DevicePolicy/DeviceAllow (cgroup device program)",
    "IPAddressDeny/IPAddressAllow (cgroup socket program)",
    "ProtectHostname (UTS namespace; sethostname is filtered anyway)",
    "ProtectKernelLogs (/dev/kmsg, /proc/kmsg; syslog() needs CAP_SYSLOG, dropped)",
    "LockPersonality",
)
API_FS = ("/proc", "/sys", "/dev")
CLONE_NEWNS = 0x00020000
NAMESPACE_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
    0x00000080,
)  # mnt, cgroup, uts, ipc, user, pid, net, time
FAMILIES = {
    "AF_UNIX": 1,
    "AF_INET": 2,
    "AF_INET6": 10,
    "AF_NETLINK": 16,
    "AF_PACKET": 17,
    "AF_BLUETOOTH": 31,
}
AF_MAX = 46
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000


def settings(unit: Path) -> dict[str, list[str]]:
    """Every Key=value of the unit, in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def command(unit: Path, argv: list[str]) -> list[str]:
    return [sys.executable, __file__, "mounts", str(unit), "--", *argv]


# ----- system calls -----------------------------------------------------------------------------


def syscall_group(name: str) -> set[str]:
    """The system calls of a systemd @group (or one call), as this systemd-analyze lists it."""
    if not name.startswith("@"):
        return {name}
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    calls: set[str] = set()
    for line in out[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            calls |= syscall_group(item)
    return calls


def allowed_syscalls(unit: dict[str, list[str]]) -> set[str]:
    """SystemCallFilter= lines in order: an allow list, then ~ removes and plain adds."""
    lines = unit.get("SystemCallFilter", [])
    if not lines or lines[0].startswith("~"):
        raise ValueError("the unit's first SystemCallFilter= line must be an allow list")
    allowed: set[str] = set()
    for line in lines:
        deny = line.startswith("~")
        names = set().union(*(syscall_group(n) for n in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


class _Cmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("a", ctypes.c_uint64),
        ("b", ctypes.c_uint64),
    ]


EQ, MASKED_EQ = 4, 7
ALLOW = 0x7FFF0000


def _errno(code: int) -> int:
    return 0x00050000 | code


class Filter:
    """One seccomp filter (libseccomp context) for the native architecture."""

    lib = None

    def __init__(self, default: int) -> None:
        if Filter.lib is None:
            Filter.lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
            Filter.lib.seccomp_init.restype = ctypes.c_void_p
            Filter.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
            Filter.lib.seccomp_rule_add_array.argtypes = [
                ctypes.c_void_p,
                ctypes.c_uint32,
                ctypes.c_int,
                ctypes.c_uint,
                ctypes.POINTER(_Cmp),
            ]
            Filter.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.ctx = Filter.lib.seccomp_init(default)

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        if nr == -1:
            return  # not a call of this architecture (e.g. arm_fadvise64_64 on x86-64)
        arr = (_Cmp * max(1, len(cmps)))(*(_Cmp(*c) for c in cmps))
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), arr)
        if rc < 0 and rc != -errno.EDOM:  # EDOM: a pseudo call this architecture lacks
            raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")

    def load(self) -> None:
        rc = self.lib.seccomp_load(self.ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def load_filters(unit: dict[str, list[str]], allowed: list[str]) -> None:
    families = {FAMILIES[f] for v in unit.get("RestrictAddressFamilies", []) for f in v.split()}
    if families:
        fam = Filter(ALLOW)
        for f in sorted(set(range(AF_MAX)) - families):
            fam.rule(_errno(errno.EAFNOSUPPORT), "socket", (0, EQ, f, 0))
        fam.load()
    if unit.get("RestrictNamespaces") == ["yes"]:
        ns = Filter(ALLOW)
        ns.rule(_errno(errno.EPERM), "setns")
        for flag in NAMESPACE_FLAGS:
            for call in ("unshare", "clone"):
                ns.rule(_errno(errno.EPERM), call, (0, MASKED_EQ, flag, flag))
        ns.rule(_errno(errno.ENOSYS), "clone3")  # flags in a struct: glibc falls back to clone
        ns.load()
    if unit.get("MemoryDenyWriteExecute") == ["yes"]:
        wx = Filter(ALLOW)
        both = PROT_WRITE | PROT_EXEC
        wx.rule(_errno(errno.EPERM), "mmap", (2, MASKED_EQ, both, both))
        for call in ("mprotect", "pkey_mprotect"):
            wx.rule(_errno(errno.EPERM), call, (2, MASKED_EQ, PROT_EXEC, PROT_EXEC))
        wx.rule(_errno(errno.EPERM), "shmat", (2, MASKED_EQ, SHM_EXEC, SHM_EXEC))
        wx.load()
    # SystemCallFilter last, as systemd does: seccomp() itself is not on the allow list.
    code = getattr(errno, unit.get("SystemCallErrorNumber", ["EPERM"])[0])
    allow = Filter(_errno(code))  # everything else fails with that errno
    for name in allowed:
        allow.rule(ALLOW, name)
    allow.load()


# ----- the file system ----------------------------------------------------------------------


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def build_mounts(unit: dict[str, list[str]], keep: list[str]) -> list[str]:
    """Remake the file system as the unit's sandbox; `keep` are paths that must stay
    reachable (this checkout, the venv). Returns what was left out, and why."""
    skipped = []
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    sh("mount", "--make-rprivate", "/")
    if unit.get("ProtectProc") == ["invisible"]:
        sh("mount", "-t", "proc", "-o", "hidepid=invisible", "proc", "/proc")
    rw = [p.lstrip("-") for p in unit.get("ReadWritePaths", [])]
    rw += [f"/var/lib/{d}" for d in unit.get("StateDirectory", [])]
    rw += [f"/run/{d}" for d in unit.get("RuntimeDirectory", [])]
    rw = [p for p in rw if os.path.isdir(p)]
    private = ["/tmp", "/var/tmp"] if unit.get("PrivateTmp") == ["yes"] else []
    hidden = ["/home", "/root", "/run/user"] if unit.get("ProtectHome") == ["yes"] else []
    made = []
    for path in private + hidden:
        if any(under(k, path) for k in keep):
            skipped.append(
                f"{'PrivateTmp' if path in private else 'ProtectHome'} on {path}: "
                "this checkout or its venv lives there"
            )
        elif os.path.isdir(path):
            opts = "mode=1777" if path in private else "mode=0755,ro"
            sh("mount", "-t", "tmpfs", "-o", opts, "tmpfs", path)
            made.append(path)
    for path in rw:
        if path not in mount_points():
            sh("mount", "--bind", path, path)
    strict = unit.get("ProtectSystem") == ["strict"]
    tunables = unit.get("ProtectKernelTunables") == ["yes"]
    proc_ro = tuple(p for p in ("/proc/sys", "/proc/sysrq-trigger") if os.path.exists(p))
    if tunables:
        for path in proc_ro:
            sh("mount", "--bind", path, path)
    for mp in mount_points():
        if any(under(mp, p) for p in rw + made):
            continue
        api = any(under(mp, a) for a in API_FS)
        if (strict and not api) or (tunables and (under(mp, "/sys") or mp in proc_ro)):
            subprocess.run(["mount", "-o", "remount,bind,ro", mp], check=False)
    return skipped


def stage_one(unit_path: Path, argv: list[str]) -> None:
    unit = settings(unit_path)
    # Worked out before the file system changes, and handed on whole: the unit file may be
    # somewhere the sandbox hides (/tmp).
    plan = json.dumps({"unit": unit, "allowed": sorted(allowed_syscalls(unit))})
    here = Path(__file__).resolve().parents[3]
    skipped = build_mounts(
        unit, [str(here), sys.prefix, sys.base_prefix, os.path.realpath(sys.executable)]
    )
    for note in skipped:
        print(f"unit_sandbox: not applied: {note}", file=sys.stderr, flush=True)
    os.umask(int(unit.get("UMask", ["0022"])[0], 8))
    os.chdir(unit.get("WorkingDirectory", ["/"])[0])
    caps = ",".join(
        f"+{c.lower().removeprefix('cap_')}" for c in unit["CapabilityBoundingSet"][0].split()
    )
    group = [f"--regid={unit['Group'][0]}", "--clear-groups"] if "Group" in unit else []
    nnp = ["--no-new-privs"] if unit.get("NoNewPrivileges") == ["yes"] else []
    os.execvp(
        "setpriv",
        [
            "setpriv",
            f"--bounding-set=-all,{caps}",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            *nnp,
            *group,
            sys.executable,
            __file__,
            "filters",
            plan,
            "--",
            *argv,
        ],
    )


def stage_two(plan: str, argv: list[str]) -> None:
    loaded = json.loads(plan)
    load_filters(loaded["unit"], loaded["allowed"])
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    stage, arg, sep, *rest = sys.argv[1:]
    assert sep == "--" and rest, "usage: unit_sandbox.py mounts UNIT -- ARGV..."
    if stage == "mounts":
        stage_one(Path(arg), rest)
    else:
        stage_two(arg, rest)
