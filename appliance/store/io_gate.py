"""The store's I/O gate: many requests at once, or one SAVE/RESTORE alone.

A command waiting for the gate goes first, so a steady stream of I/O cannot starve SAVE or
RESTORE; requests that arrive while it waits queue behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class IoGate:
    """Many I/O requests at once, or one SAVE/RESTORE alone; a waiting command goes first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.active = 0
        self._exclusive = False
        self._waiting = 0
        self._idle_waiters = 0

    def enter(self) -> None:
        with self._lock:  # the common case costs one uncontended lock, not a Condition
            if not (self._exclusive or self._waiting):
                self.active += 1
                return
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self.active += 1

    def leave(self) -> None:
        with self._lock:
            self.active -= 1
            if not self.active and (self._waiting or self._idle_waiters):
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self.active:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    @contextmanager
    def exclusive_if_idle(self, timeout: float) -> Iterator[bool]:
        """Alone, if a moment comes within `timeout` when no request runs; yields whether it
        did. Unlike exclusive(), new requests are never held back while it waits."""
        with self._cond:
            self._idle_waiters += 1
            try:
                got = self._cond.wait_for(
                    lambda: not (self._exclusive or self.active or self._waiting), timeout
                )
            finally:
                self._idle_waiters -= 1
            if got:
                self._exclusive = True
        try:
            yield got
        finally:
            if got:
                with self._cond:
                    self._exclusive = False
                    self._cond.notify_all()
