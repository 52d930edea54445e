"""The daemon: store + NBD server + command bus + control socket + whichever parts the config
enables (gadget, host serial, gpio, ble), on one asyncio loop.

Start order: store (created if asked) -> bus -> on_boot restore policy -> NBD -> control
socket -> parts. A part that cannot start is reported once (status shows it failed, with
the reason) and the rest keeps running. READY=1 goes to systemd once all enabled parts were
tried; SIGTERM/SIGINT finish the running command and in-flight I/O, flush, and stop
everything in reverse order. `savepoint serve` is this same daemon with serve_config().
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from appliance import runtime_dirs
from appliance.background import background_pass
from appliance.config import part_config
from appliance.config_sections import CoreConfig, parse_hostport
from appliance.control.bus import CommandBus
from appliance.control.commands import Event, Part, PartUnavailable, StoreHooks
from appliance.control.host_quiet import HostActivity
from appliance.control.restore_policies import RestorePolicies
from appliance.control.socket import ControlLimits, ControlServer, socket_group
from appliance.logs import setup_logging
from appliance.nbd.server import NbdServer
from appliance.parts import PartContext, PartSpec, all_parts, load_spec
from appliance.runtime_dirs import (
    SYSTEM_RUNTIME_DIR,
    default_control_path,
    default_nbd_path,
    runtime_dir,
)
from appliance.store import InitError, Store, StoreError, create_store
from appliance.store.filesystem import FULL_HINT, PUNCH_HINT, overcommit_warning
from appliance.systemd_notify import Notifier

log = logging.getLogger("savepoint.daemon")

TICK = 1.0  # seconds between relock/schedule/watchdog checks


class StartupError(Exception):
    """The daemon cannot run at all (store or NBD); the message says what to do."""


class Daemon:
    def __init__(
        self,
        cfg: dict[str, Any],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        on_ready: Callable[[Daemon], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.core = CoreConfig.of(cfg)  # the daemon's own sections, typed
        self.clock, self.wall = clock, wall
        self.notifier = notifier or Notifier()
        self.on_ready = on_ready
        self.store: Store | None = None
        self.nbd: NbdServer | None = None
        self.activity = HostActivity(clock)  # the host's writes, for SAVE's wait for quiet
        self.bus: CommandBus | None = None
        self.control: ControlServer | None = None
        self.policies: RestorePolicies | None = None
        self.parts: list[tuple[PartSpec, Part]] = []  # started parts, in start order
        self.nbd_socket = self.core.nbd.socket or default_nbd_path()
        self.control_socket = self.core.control.socket or default_control_path()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()  # one-off status publications

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
        except StartupError as e:
            log.error("%s", e)
            return 1
        finally:
            await self.shutdown()  # whatever happened: in-flight I/O done, store flushed
        return 0

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: finishing in-flight I/O")
        self._stop.set()

    async def start(self) -> None:
        self._prepare_runtime_dir()
        self.store = store = await asyncio.to_thread(self._open_store)
        lock, save = self.core.lock, self.core.save
        self.bus = CommandBus(
            store,
            self.cfg["policy"],
            lock_enabled=lock.enabled,
            relock_after=lock.relock_after,
            single_use=lock.single_use,
            clock=self.clock,
            wall=self.wall,
            activity=self.activity,
            settle=save.settle,
            max_wait=save.max_wait,
        )
        self.bus.status_extras.append(self._nbd_status)
        self._watch_storage(store)
        self.policies = RestorePolicies(
            self.bus, self.core.restore.policies(), self.core.restore.at, now=self.wall
        )
        await self.policies.on_boot()  # before any host can read the disk
        await self._start_nbd(store)
        ccfg = self.core.control
        limits = ControlLimits.from_config(ccfg.as_dict())
        self.control = ControlServer(self.bus, self.control_socket, ccfg.group, limits=limits)
        try:
            await self.control.start()
        except (OSError, RuntimeError) as e:
            self.control = None
            raise StartupError(f"control socket {self.control_socket}: {e}") from None
        self.bus.set_part("control", "up", self.control_socket)
        for name in self.cfg["parts"]:  # every part the config knows, in start order
            await self._start_part(name)
        line = await self._status_line()
        self.notifier.ready(line)
        log.info("ready: %s", line)
        self._tasks = [
            asyncio.create_task(self._ticker(line), name="tick"),
            asyncio.create_task(self.activity.watch(), name="host-activity"),
        ]
        if self.core.store.background:
            self._tasks.append(
                asyncio.create_task(
                    background_pass(store, self.bus, self._io_busy), name="background"
                )
            )
        if self.on_ready:
            self.on_ready(self)

    async def shutdown(self) -> None:
        self.notifier.stopping()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.bus is not None:
            await self.bus.close()  # waits for a running SAVE/RESTORE, refuses new ones
        for spec, part in reversed(self.parts):
            if spec.store_hooks and self.bus is not None and self.bus.hooks is part:
                self.bus.hooks = None
            try:
                await part.stop()
            except Exception:
                log.exception("part %s did not stop cleanly", spec.name)
        self.parts.clear()
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.nbd is not None:  # finishes in-flight requests, closes, flushes the store
            await asyncio.to_thread(self.nbd.stop, True)
            self.nbd = None
        if self.store is not None:
            await asyncio.to_thread(self.store.flush)
            await asyncio.to_thread(self.store.close)
            self.store = None
            log.info("stopped: store flushed and closed")

    # -- store and NBD -----------------------------------------------------------------
    def _prepare_runtime_dir(self) -> None:
        """The default runtime directory is made private and checked (a spoofed one is
        refused); a folder the config names is only created."""
        for path in (self.nbd_socket, self.control_socket):
            folder = os.path.dirname(path)
            if folder == runtime_dir():
                gid = socket_group(self.core.control.group)
                try:
                    runtime_dirs.prepare(folder, gid if folder == SYSTEM_RUNTIME_DIR else None)
                except (runtime_dirs.UnsafeDir, OSError) as e:
                    raise StartupError(f"runtime directory: {e}") from None
            elif folder and not os.path.isdir(folder):
                os.makedirs(folder, mode=0o755, exist_ok=True)

    def _open_store(self) -> Store:
        cfg = self.core.store  # validated: unit and map_cache are bytes, size bytes or ""
        path = cfg.path
        if not path:
            raise StartupError("[store] path is not set: give the backing file or device")
        if cfg.create and not os.path.exists(path):
            if cfg.size == "":
                raise StartupError(
                    f"{path} does not exist: give a size to create it "
                    "(savepoint serve {path} --size 1G)"
                )
            size, unit = int(cfg.size), int(cfg.unit)
            try:
                create_store(path, size, unit, allow_overcommit=cfg.allow_overcommit)
            except (StoreError, InitError, OSError, ValueError) as e:
                raise StartupError(f"cannot create the store at {path}: {e}") from None
            log.info("created store %s: %d bytes, unit %d", path, size, unit)
        try:
            return Store.open(path, map_cache=int(cfg.map_cache))
        except (StoreError, OSError) as e:
            raise StartupError(f"cannot open the store at {path}: {e}") from None

    async def _start_nbd(self, store: Store) -> None:
        ncfg = self.core.nbd
        gid = socket_group(ncfg.group)
        try:
            tcp = parse_hostport(ncfg.tcp) if ncfg.tcp else None
            nbd = NbdServer(
                store,
                unix_path=self.nbd_socket,
                tcp=tcp,
                allow_remote=ncfg.allow_remote,
                socket_mode=0o600,
                group=ncfg.group if gid is not None else None,
                export_name=ncfg.export_name,
                max_connections=ncfg.max_connections,
            )
            nbd.activity = self.activity
            nbd.start()
        except (OSError, ValueError, RuntimeError) as e:
            raise StartupError(f"NBD server: {e}") from None
        self.nbd = nbd
        assert self.bus is not None
        self.bus.set_part("nbd", "up", " ".join(nbd.uris))

    def _io_busy(self) -> bool:
        return self.nbd is not None and self.nbd.inflight > 0

    def _nbd_status(self) -> dict[str, Any]:
        if self.nbd is None:
            return {}
        return {
            "nbd_uris": list(self.nbd.uris),
            "inflight": self.nbd.inflight,
            "nbd_clients": self.nbd.active_connections,
        }

    # -- the backing storage's "full" fault (appliance/store/space.py) -------------------------
    def _watch_storage(self, store: Store) -> None:
        space = store.space
        loop = asyncio.get_running_loop()

        def changed() -> None:  # called from an I/O thread
            loop.call_soon_threadsafe(self._storage_changed)

        space.listeners.append(changed)
        warning = overcommit_warning(space.status())
        if warning:
            log.warning("%s", warning)
        self._storage_changed()

    def _storage_changed(self) -> None:
        """The store entered or left the "full" state, or its hole punches started or stopped
        failing: the part row, LED and watch follow ("full" wins: it stops writes)."""
        if self.bus is None or self.store is None:
            return
        space = self.store.space
        part = self.bus.parts.get("storage", {})
        was = part.get("state")
        reason, hint = (
            (space.full_reason, FULL_HINT) if space.full_reason else (space.punch_fault, PUNCH_HINT)
        )
        if reason:
            if was != "failed" or part.get("reason") != reason:
                self.bus.set_part("storage", "failed", reason, hint)
        else:
            self.bus.set_part("storage", "up", space.kind)
            if was == "failed":
                self.bus.publish(
                    Event("fault", {"part": "storage", "cleared": True, "reason": "", "hint": ""})
                )
        if was is not None and (was == "failed") != bool(reason):
            task = asyncio.get_running_loop().create_task(self._publish_state())
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _publish_state(self) -> None:
        if self.bus is not None:
            self.bus.publish(Event("state", await self.bus.snapshot()))

    # -- optional parts --------------------------------------------------------------------
    async def _start_part(self, name: str) -> None:
        """Make and start one part from its spec (appliance/parts.py); a part that cannot run
        here, or breaks, is a `failed` row with a reason, and the appliance keeps working."""
        assert self.bus is not None
        pcfg = dict(self.cfg["parts"][name])
        if not pcfg.pop("enabled", False):
            self.bus.set_part(name, "off", "disabled in the config")
            return
        try:
            spec = load_spec(name)
        except (ImportError, AttributeError) as e:
            self._part_failed(
                name,
                f"{all_parts()[name]} is not available: {e}",
                "install the full savepoint package",
            )
            return
        try:
            settings = part_config(spec, pcfg)
            if spec.history is not None:  # its past shows in `history` even if it fails now
                self.bus.history_sources[name] = functools.partial(spec.history, settings)
            part = spec.make(settings, PartContext(self.bus, self.nbd_socket))
            if spec.store_hooks and not isinstance(part, StoreHooks):
                raise TypeError(
                    f"{type(part).__name__} declares store_hooks but lacks "
                    "before_save/around_restore"
                )
            await part.start()
        except PartUnavailable as e:
            self._part_failed(name, e.reason, e.hint)
            return
        except Exception as e:  # a broken part is reported, the appliance keeps working
            log.exception("part %s crashed while starting", name)
            self._part_failed(name, f"crashed while starting: {e}", "see the log")
            return
        self.parts.append((spec, part))
        self.bus.set_part(name, "up")
        if isinstance(part, StoreHooks) and spec.store_hooks:  # the one place bus.hooks is
            self.bus.hooks = part  # set: SAVE syncs, RESTORE ejects
        log.info("part %s: up", name)

    def _part_failed(self, section: str, reason: str, hint: str) -> None:
        assert self.bus is not None
        log.warning("part %s failed: %s%s", section, reason, f" ({hint})" if hint else "")
        self.bus.set_part(section, "failed", reason, hint)

    # -- loops ---------------------------------------------------------------------------
    async def _ticker(self, last_status: str) -> None:
        assert self.bus is not None and self.policies is not None
        interval = min(TICK, self.notifier.watchdog_interval or TICK)
        while True:
            self.notifier.watchdog() if self.notifier.watchdog_interval else None
            try:
                if self.store is not None:
                    self.store.space.poll()  # the "full" fault clears once there is room
                await self.bus.tick()
                await self.policies.tick()
                line = await self._status_line()
                if line != last_status:
                    self.notifier.status(line)
                    last_status = line
            except Exception:  # the loop must keep pinging: log and go on
                log.exception("periodic check failed")
            await asyncio.sleep(interval)

    async def _status_line(self) -> str:
        assert self.bus is not None
        st = await self.bus.snapshot()
        failed = [n for n, p in self.bus.parts.items() if p["state"] == "failed"]
        text = f"{st['mode']}, epoch {st.get('epoch')}, {st.get('dirty_units', 0)} unsaved units"
        if st.get("waiting"):
            text += f", {st['waiting']}"
        return text + (f", failed: {', '.join(failed)}" if failed else "")


def run_daemon(cfg: dict[str, Any], on_ready: Callable[[Daemon], None] | None = None) -> int:
    setup_logging(CoreConfig.of(cfg).log.level)
    daemon = Daemon(cfg, on_ready=on_ready)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(daemon.run())
    return 130
