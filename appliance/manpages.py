"""Manual pages and shell completion generated from the commands' own argument parsers.

    python -m appliance.manpages PREFIX     # PREFIX/share/man/man1/*.1 and completions

argparse-manpage writes the pages and shtab the bash and zsh completion, so neither can drift
from the options the commands really take. The Pi installer runs it with PREFIX=/usr/local;
the development environment with PREFIX=.venv (found by `man` when .venv/bin is on PATH).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from appliance import __version__


def parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    from appliance.cli import build_parser
    from appliance.usb.host_client import build_parser as host_parser
    from ble.fob_client import parser as fob_parser

    return {"savepoint": build_parser, "savepoint-host": host_parser, "savepoint-fob": fob_parser}


def manpage(parser: argparse.ArgumentParser) -> str:
    from argparse_manpage.manpage import Manpage

    page = Manpage(
        parser,
        _data={
            "project_name": "savepoint",
            "version": __version__,
            "manual_title": "Savepoint manual",
            "description": parser.description,
        },
    )
    return str(page)


def completion(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab

    return shtab.complete(parser, shell=shell)


def write_all(prefix: Path) -> list[Path]:
    """Write every page and completion under prefix; returns the files written."""
    share = prefix / "share"
    targets = {
        "man": (share / "man" / "man1", "{name}.1", manpage),
        "bash": (
            share / "bash-completion" / "completions",
            "{name}",
            lambda p: completion(p, "bash"),
        ),
        "zsh": (share / "zsh" / "site-functions", "_{name}", lambda p: completion(p, "zsh")),
    }
    written = []
    for name, make in parsers().items():
        for folder, pattern, render in targets.values():
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / pattern.format(name=name)
            path.write_text(render(make()))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.manpages", description=__doc__)
    p.add_argument("prefix", type=Path, help="install prefix, e.g. /usr/local or .venv")
    args = p.parse_args(argv)
    for path in write_all(args.prefix):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
