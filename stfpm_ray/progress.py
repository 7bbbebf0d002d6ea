"""Progress messages and fixed-width tables: the one way every layer talks to the person running it.

Library functions take a ``progress`` callable (default :func:`log_progress`: the ``stfpm_ray`` logger at
INFO), so a caller can silence or redirect them; the CLI routes that logger to stdout.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Protocol

from tqdm import tqdm

LOGGER = logging.getLogger("stfpm_ray")
# "1": Ray's own logs and progress bars reach the terminal too (the CLI's -v; read when Ray starts).
VERBOSE_VARIABLE = "STFPM_RAY_VERBOSE"


class Progress(Protocol):
    """Receives one human-readable line per call."""

    def __call__(self, message: str) -> None: ...


def log_progress(message: str) -> None:
    """The default :class:`Progress`: one INFO record of the ``stfpm_ray`` logger."""
    LOGGER.info(message)


def quiet(message: str) -> None:
    """A :class:`Progress` that drops every message."""


def fixed_width_table(header: Sequence[str], rows: Sequence[Sequence[object]], rule: bool = False) -> str:
    """Aligned text: the first column left-aligned, the others right-aligned, widths from the content.

    Cells are formatted with ``str``; format numbers before passing them. ``rule`` draws a line of dashes
    under the header.
    """
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(row[1:], 1)]
        return "  ".join(parts).rstrip()

    lines = [line(cells[0])]
    if rule:
        lines.append("-" * len(lines[0]))
    return "\n".join(lines + [line(row) for row in cells[1:]])


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


class Meter:
    """Work done out of a total, with rate, errors so far and an ETA.

    A tqdm bar when the default progress goes to a terminal; otherwise (redirected to a file, a job log,
    or a caller's own ``progress``) one plain line at most every ``interval`` seconds, so a night of
    scoring logs a few hundred lines, not one per batch.
    """

    def __init__(self, total: int, unit: str, progress: Progress, interval: float = 30.0) -> None:
        self.total, self.unit, self.progress, self.interval = total, unit, progress, interval
        self.started = self.last_line = time.monotonic()
        self.done = self.errors = 0
        on_terminal = progress is log_progress and sys.stdout.isatty() and LOGGER.isEnabledFor(logging.INFO)
        self.bar = tqdm(total=total, unit=unit, file=sys.stdout, dynamic_ncols=True) if on_terminal else None

    def update(self, done: int, errors: int = 0) -> None:
        done = min(done, self.total)
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(errors=errors, refresh=False)
        self.done, self.errors = done, errors
        now = time.monotonic()
        if self.bar is None and now - self.last_line >= self.interval:
            self.last_line = now
            self.progress(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {_duration((self.total - self.done) / rate)}" if 0 < self.done < self.total else ""
        return (
            f"{self.done}/{self.total} {self.unit} ({rate:.1f}/s), {self.errors} errors so far, "
            f"{_duration(elapsed)} elapsed{eta}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
