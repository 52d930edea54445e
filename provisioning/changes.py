"""Planned changes and the install manifest that lets --uninstall undo them exactly.

A `Change` is planned first (what it would do, as diff-like lines) and applied later; applying
returns manifest records. The manifest (JSON, plus a copy of every file before it was edited)
lives in /var/lib/savepoint/install-manifest and is saved after every change, so even an
interrupted install can be undone.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Record = dict[str, Any]
MANIFEST_DIR = "/var/lib/savepoint/install-manifest"
_SHOW_NEW_FILE_LINES = 12


def on(root: Path, path: str) -> Path:
    """A system path (/etc/x) inside the target root."""
    return root / path.lstrip("/")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Change:
    summary: str  # "+ /etc/x (new file)", "~ /boot/firmware/config.txt", "+ group savepoint"
    apply: Callable[[Manifest], None]
    detail: list[str] = field(default_factory=list)

    def show(self) -> str:
        return "\n".join([f"  {self.summary}", *(f"      {line}" for line in self.detail)])


class Manifest:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = on(root, MANIFEST_DIR)
        self.file = self.dir / "manifest.json"
        self.records: list[Record] = []
        if self.file.exists():
            self.records = json.loads(self.file.read_text())["records"]

    def find(self, kind: str, path: str | None = None) -> Record | None:
        for rec in reversed(self.records):
            if rec["type"] == kind and (path is None or rec.get("path") == path):
                return rec
        return None

    def add(self, record: Record) -> None:
        self.records.append(record)
        self.save()

    def save(self) -> None:
        self._ensure()
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "records": self.records}, indent=1) + "\n")
        os.replace(tmp, self.file)

    def _ensure(self) -> None:
        if not self.dir.exists():  # record the parents we create, so uninstall removes them
            missing, d = [], Path(MANIFEST_DIR).parent
            while not on(self.root, str(d)).exists():
                missing.insert(0, {"type": "dir", "path": str(d)})
                d = d.parent
            for rec in missing:
                on(self.root, rec["path"]).mkdir(mode=0o700 if rec is missing[-1] else 0o755)
            self.records[:0] = missing
            self.dir.mkdir(mode=0o700)

    def backup(self, path: str) -> str:
        """Copy a file about to be edited; returns its name inside backups/."""
        self._ensure()
        name = f"{len(self.records):03d}-{Path(path).name}"
        (self.dir / "backups").mkdir(exist_ok=True)
        shutil.copy2(on(self.root, path), self.dir / "backups" / name)
        return name

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def make_dirs(manifest: Manifest, path: str, mode: int = 0o755) -> None:
    """mkdir -p, recording every directory it creates."""
    missing = []
    parent = Path(path)
    while not on(manifest.root, str(parent)).exists():
        missing.append(str(parent))
        parent = parent.parent
    for d in reversed(missing):
        on(manifest.root, d).mkdir(mode=mode)
        manifest.add({"type": "dir", "path": d})


def _diff(old: str, new: str) -> list[str]:
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), n=1, lineterm="")
    return [line for line in lines if not line.startswith(("---", "+++"))]


def file_change(
    root: Path,
    path: str,
    text: str,
    mode: int = 0o644,
    private: bool = False,
    show_all: bool = False,
) -> Change | None:
    """Make `path` hold `text`; None when it already does. An existing file keeps its mode;
    `private` (a file that may hold a secret) makes it 0600, and takes group and other
    access from an existing one."""
    if private:
        mode = 0o600
    target = on(root, path)
    new = text.encode()
    old = target.read_bytes() if target.exists() else None
    loose = private and old is not None and target.stat().st_mode & 0o077
    if old == new and not loose:
        return None
    if old == new:
        detail, summary = [], f"~ {path} (mode 0600: it may hold a secret)"
    elif old is None:
        lines = text.splitlines()
        detail = (
            [f"+{line}" for line in lines]
            if len(lines) <= _SHOW_NEW_FILE_LINES or show_all
            else [f"({len(lines)} lines)"]
        )
        summary = f"+ {path} (new file)"
    else:
        detail, summary = _diff(old.decode(errors="replace"), text), f"~ {path}"

    def apply(manifest: Manifest) -> None:
        make_dirs(manifest, str(Path(path).parent))
        backup = manifest.backup(path) if old is not None else None
        keep = target.stat().st_mode & 0o7777 if old is not None else mode
        if private:
            keep &= 0o700
        tmp = target.with_name(f".{target.name}.savepoint-tmp")
        tmp.write_bytes(new)
        os.chmod(tmp, keep)
        os.replace(tmp, target)
        added = [
            line[1:]
            for line in _diff((old or b"").decode(errors="replace"), text)
            if line.startswith("+")
        ]
        manifest.add(
            {"type": "file", "path": path, "backup": backup, "sha256": sha256(new), "added": added}
        )

    return Change(summary, apply, detail)


def symlink_change(root: Path, path: str, target: str) -> Change | None:
    link = on(root, path)
    if link.is_symlink() and os.readlink(link) == target:
        return None

    def apply(manifest: Manifest) -> None:
        make_dirs(manifest, str(Path(path).parent))
        if link.is_symlink():  # a stale link of ours (e.g. different target): replace it
            link.unlink()
        link.symlink_to(target)
        manifest.add({"type": "symlink", "path": path, "target": target})

    return Change(f"+ {path} -> {target}", apply)


def dir_change(root: Path, path: str, mode: int = 0o755) -> Change | None:
    if on(root, path).is_dir():
        return None
    return Change(f"+ {path}/ (directory)", lambda m: make_dirs(m, path, mode))


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    """Run a command with its output (and progress) shown; a failure stops the install."""
    print("    $ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)
