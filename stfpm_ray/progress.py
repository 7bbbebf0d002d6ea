"""Progress messages and fixed-width tables: the one way every layer talks to the person running it.

Library functions take a ``progress`` callable (default :func:`log_progress`: the ``stfpm_ray`` logger at
INFO), so a caller can silence or redirect them; the CLI routes that logger to stdout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

LOGGER = logging.getLogger("stfpm_ray")


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
