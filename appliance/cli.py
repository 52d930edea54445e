"""`savepoint`: run the daemon (serve, daemon), talk to it (save, restore, unlock, lock, status,
history, watch, pair: appliance/cli_talk.py; a part's own commands such as `fobs` come with
its spec, appliance/parts.py) and work on a store that is not served (init, inspect, history
TARGET: appliance/store/cli.py).

Errors exit non-zero with a one-line reason on stderr; every talking command takes --json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from appliance import __version__
from appliance.cli_support import create_for_serve, join_negative_sizes, own_command, sockets_taken
from appliance.cli_talk import add_talk_commands, fail
from appliance.config import ConfigError, serve_config
from appliance.parts import cli_specs
from appliance.runtime_dirs import default_control_path
from appliance.sizes import human
from appliance.store.cli import add_store_commands, parse_size


def build_parser(with_parts: bool = True) -> argparse.ArgumentParser:
    """Every command; without the parts' (`with_parts=False`) no part's spec is imported."""
    return _build(with_parts)[0]


def _build(with_parts: bool) -> tuple[argparse.ArgumentParser, set[str]]:
    parser = argparse.ArgumentParser(prog="savepoint", description="A disk with SAVE and RESTORE.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("serve", help="serve a store over NBD (creates it if missing)")
    p.add_argument("target", help="backing file or block device")
    p.add_argument("--size", type=parse_size, help="disk size when creating, e.g. 1G")
    p.add_argument("--unit", type=parse_size, default=4096, help="unit size when creating (4K)")
    p.add_argument("--socket", help="NBD Unix socket path (default: <runtime dir>/nbd.sock)")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also serve NBD on TCP (loopback)")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --tcp address (NBD has no authentication)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="NBD clients served at once; more are refused (default 8)",
    )
    p.add_argument("--control", help="control socket path (default: <runtime dir>/control.sock)")
    p.add_argument(
        "--allow-overcommit",
        action="store_true",
        help="when creating: allow a store file larger than the free space of its "
        "file system (sparse; writes fail with 'no space left' when it fills)",
    )
    p.add_argument(
        "--map-cache",
        metavar="SIZE",
        help="RAM for the unit map whatever the disk size (default 32M; "
        "docs/config.md: how to choose)",
    )
    p.add_argument(
        "--config",
        help="TOML with more sections: parts such as [mqtt], [lock], "
        "[policy] (not [store]); the options above win",
    )
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("daemon", help="run the appliance daemon from a config file")
    p.add_argument("--config", default="/etc/savepoint/config.toml", help="TOML config")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(func=cmd_daemon)
    add_talk_commands(sub)  # save, restore, ..., pair
    for spec in cli_specs() if with_parts else ():  # the parts' own: fobs, buttons, ...
        assert spec.cli is not None
        spec.cli(sub)
    add_store_commands(sub)  # init, inspect
    return parser, set(sub.choices)


def main(argv: list[str] | None = None) -> int:
    argv = join_negative_sizes(sys.argv[1:] if argv is None else argv)
    args = parser_for(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """The core commands' parser when argv names one (`status`, `save`: run often, from
    scripts too), so no part's spec module is imported; else (--help, a part's command, a
    typo) the parser with every part's commands."""
    core, commands = _build(with_parts=False)
    command = next((a for a in argv if not a.startswith("-")), None)
    return core if command in commands else build_parser()


# -- running the daemon ---------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.daemon import run_daemon

    if not os.path.exists(args.target) and args.size is None:
        return fail(
            f"{args.target} does not exist; give --size to create it, e.g. "
            f"savepoint serve {args.target} --size 1G"
        )
    try:
        extra = read_toml(args.config) if args.config else None
        cfg = serve_config(
            os.path.abspath(args.target),
            args.size,
            args.unit,
            args.socket,
            args.tcp,
            args.allow_remote,
            args.control,
            args.max_connections,
            allow_overcommit=args.allow_overcommit,
            map_cache=args.map_cache,
            extra=extra,
        )
    except ConfigError as e:
        return fail(
            str(e)
            .replace("[store] ", "--")
            .replace("[nbd] ", "--")
            .replace("--max_connections", "--max-connections")
            .replace("--map_cache", "--map-cache")
        )
    busy = sockets_taken(args)
    if busy:
        return fail(busy)
    created = not os.path.exists(args.target)
    if created:
        if create_for_serve(args):
            return 1
    elif args.size is not None:
        print(
            f"savepoint: {args.target} exists: serving it as it is (--size ignored)",
            file=sys.stderr,
        )
    ready: list[bool] = []

    def on_ready(daemon: Any) -> None:
        ready.append(True)
        print_serving(daemon, args)

    code = run_daemon(cfg, on_ready=on_ready)
    if created and not ready:  # it never served: leave nothing behind
        with contextlib.suppress(OSError):
            os.unlink(args.target)
    return code


def read_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from None


def print_serving(daemon: Any, args: argparse.Namespace) -> None:
    st = daemon.store.status()
    print(
        f"Savepoint: serving {args.target} ({human(st['size'])}, unit "
        f"{human(st['unit_size'])}, epoch {st['epoch']}, {st['dirty_units']} unsaved units)"
    )
    for uri in daemon.nbd.uris:
        print(f"NBD: {uri}")
    print("Connect with:")
    print(daemon.nbd.examples())
    control = (
        ""
        if daemon.control_socket == default_control_path()
        else f" --control {daemon.control_socket}"
    )
    print(f"Control: {own_command()} save|restore|status|history|watch{control}")
    from appliance.store.filesystem import overcommit_warning

    warning = overcommit_warning(st.get("space") or {})
    if warning:
        print(f"savepoint: warning: {warning}", file=sys.stderr)
    print("Stop with Ctrl-C.", flush=True)


def cmd_daemon(args: argparse.Namespace) -> int:
    from appliance.config import load
    from appliance.daemon import run_daemon

    try:
        cfg = load(args.config)
    except ConfigError as e:
        return fail(f"config: {e}", 2)
    if args.check:
        print(f"{args.config}: OK")
        return 0
    return run_daemon(cfg)


if __name__ == "__main__":
    sys.exit(main())
