"""Ecosystem conventions: man pages and completion from the parsers, a banner that names the
command the user really has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from appliance.manpages import write_all
from tests.test_daemon_support import env, short_dir

BIN = Path(sys.executable).parent


def test_man_savepoint_opens_our_page(tmp_path):
    write_all(tmp_path)
    e = {**env(), "MANPATH": str(tmp_path / "share/man"), "MANWIDTH": "100"}
    where = subprocess.run(["man", "-w", "savepoint"], capture_output=True, text=True, env=e)
    assert where.stdout.strip() == str(tmp_path / "share/man/man1/savepoint.1")
    page = subprocess.run(["man", "savepoint"], capture_output=True, text=True, env=e).stdout
    assert "SAVEPOINT(1)" in page and "serve a store over NBD" in page and "--version" in page
    for name in ("savepoint-host", "savepoint-fob"):
        assert (tmp_path / f"share/man/man1/{name}.1").read_text().startswith(".TH")


def test_dev_env_pages_are_found_through_path():
    venv_bin = str(BIN)
    e = {**env(), "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    e.pop("MANPATH", None)
    where = subprocess.run(["man", "-w", "savepoint"], capture_output=True, text=True, env=e)
    assert where.stdout.strip() == str(BIN.parent / "share/man/man1/savepoint.1")


def test_bash_completion_completes_subcommands_and_options(tmp_path):
    write_all(tmp_path)
    script = tmp_path / "share/bash-completion/completions/savepoint"
    probe = (
        f"source {script}; COMP_WORDS=(savepoint ser); COMP_CWORD=1; "
        "$(complete -p savepoint | sed -E 's/.*-F ([^ ]+).*/\\1/') savepoint ser savepoint;"
        " echo ${COMPREPLY[@]}; COMP_WORDS=(savepoint init --s); COMP_CWORD=2; "
        "$(complete -p savepoint | sed -E 's/.*-F ([^ ]+).*/\\1/') savepoint --s init;"
        " echo ${COMPREPLY[@]}"
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True).stdout.split("\n")
    assert out[0].split() == ["serve"]
    assert "--size" in out[1].split()
    assert (tmp_path / "share/zsh/site-functions/_savepoint").read_text().startswith("#compdef")


def test_installer_docs_change_installs_pages_under_usr_local(tmp_path, monkeypatch):
    from provisioning import system
    from provisioning.changes import Manifest

    venv_bin = tmp_path / system.VENV.lstrip("/") / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv_bin / "python").chmod(0o755)
    m = Manifest(tmp_path)
    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])
    system.docs_change(tmp_path).apply(m)
    page = tmp_path / "usr/local/share/man/man1/savepoint.1"
    assert page.exists()
    assert any(r["path"] == "/usr/local/share/man/man1/savepoint.1" for r in m.records)


def test_serve_banner_names_the_command_as_typed(tmp_path):
    d = short_dir()
    e = {**env(), "PATH": "/usr/bin:/bin"}  # .venv/bin is not on PATH
    proc = subprocess.Popen(
        [
            str(BIN / "savepoint"),
            "serve",
            str(tmp_path / "d.img"),
            "--size",
            "16M",
            "--socket",
            f"{d}/n.sock",
            "--control",
            f"{d}/c.sock",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=e,
    )
    try:
        assert proc.stdout is not None
        lines = []
        while not (line := proc.stdout.readline()).startswith("Stop with") and line:
            lines.append(line)
        control = next(x for x in lines if x.startswith("Control:"))
        assert control.startswith(f"Control: {BIN / 'savepoint'} save|restore")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
