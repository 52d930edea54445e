"""Progress bars on a terminal (tqdm), silence otherwise: cron, pipes and logs get no bars."""

from __future__ import annotations

import shutil
import sys
from types import TracebackType
from typing import Any


class Progress:
    """update(done, total) in bytes; shown on stderr only when it is a terminal."""

    def __init__(self, label: str, stream: Any = None, force: bool | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.shown = self.stream.isatty() if force is None else force
        self._bar: Any = None

    def update(self, done: int, total: int) -> None:
        if not self.shown or total <= 0:
            return
        if self._bar is None:
            from tqdm import tqdm

            size = shutil.get_terminal_size()  # a pty may report 0 x 0: this falls back
            self._bar = tqdm(
                total=total,
                desc=self.label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                leave=True,
                mininterval=0.25,
                ncols=size.columns,
                nrows=size.lines,
            )
        self._bar.update(min(done, total) - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:  # ends the bar's line: the next message starts on its own
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
