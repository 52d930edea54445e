"""--uninstall: reverse every manifest record, newest first, and leave the store's data alone."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from provisioning.changes import Change, Manifest, Record, on, run, sha256


def _undo_file(m: Manifest, rec: Record) -> Change:
    path, target = rec["path"], on(m.root, rec["path"])
    backup = m.dir / "backups" / rec["backup"] if rec["backup"] else None
    current = target.read_bytes() if target.exists() else None
    if current is not None and sha256(current) != rec["sha256"]:
        # Edited since we wrote it: take out only the lines we added, keep the user's edits.
        lines = current.decode(errors="replace").splitlines(keepends=True)
        for added in rec["added"]:
            for i, line in enumerate(lines):
                if line.rstrip("\n") == added:
                    del lines[i]
                    break

        def strip(_: Manifest) -> None:
            if backup is None and not "".join(lines).strip():
                target.unlink()
            else:
                target.write_text("".join(lines))
            print(f"  note: {path} changed after install; removed only the installer's lines")

        return Change(f"~ {path} (changed since install: remove the installer's lines)", strip)

    def restore(_: Manifest) -> None:
        if backup is not None:
            shutil.copy2(backup, target)  # bytes and mode, exactly as before
        elif target.exists():
            target.unlink()

    verb = f"restore {path} as it was" if backup else f"remove {path}"
    return Change(f"- {verb}", restore)


def _undo_packages(rec: Record) -> Change:
    names = rec["names"]

    def apply(_: Manifest) -> None:
        sim = subprocess.run(
            ["apt-get", "-s", "purge", *names], capture_output=True, text=True, check=False
        )
        gone = {
            line.split()[1]
            for line in sim.stdout.splitlines()
            if line.startswith(("Purg ", "Remv "))
        }
        extra = gone - set(names)
        if extra:
            print(
                f"  note: kept {' '.join(names)}: removing them would also remove "
                f"{' '.join(sorted(extra))}"
            )
            return
        run(
            ["apt-get", "purge", "-y", *names],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )

    return Change(f"- apt-get purge {' '.join(names)} (packages the installer added)", apply)


def undo_change(m: Manifest, rec: Record) -> Change | None:
    kind, path = rec["type"], rec.get("path", "")
    target = on(m.root, path)
    if kind == "file":
        return _undo_file(m, rec)
    if kind == "symlink":
        if not target.is_symlink():
            return None
        return Change(f"- {path}", lambda _: target.unlink())
    if kind == "tree":
        if not target.exists():
            return None
        return Change(
            f"- {path}/ (virtualenv and everything in it)", lambda _: shutil.rmtree(target)
        )
    if kind == "group":
        return Change(f"- group {rec['name']}", lambda _: run(["groupdel", rec["name"]]))
    if kind == "packages":
        return _undo_packages(rec)
    return None  # "store": its data stays; "dir": removed at the very end when empty


def remove_dirs(m: Manifest) -> list[str]:
    """rmdir the directories the installer created, deepest first; returns those kept."""
    kept = []
    for rec in reversed(m.records):
        if rec["type"] != "dir":
            continue
        d = on(m.root, rec["path"])
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            kept.append(rec["path"])
    return kept


def store_paths(m: Manifest) -> list[str]:
    return [rec["path"] for rec in m.records if rec["type"] == "store"]


def is_installed(root: Path) -> bool:
    return Manifest(root).file.exists()
