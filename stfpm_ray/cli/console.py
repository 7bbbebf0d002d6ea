"""Where the CLI's output goes: progress lines of the ``stfpm_ray`` logger on stdout, library warnings on stderr."""

from __future__ import annotations

import logging
import os
import sys

from stfpm_ray.progress import LOGGER, VERBOSE_VARIABLE


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time of each record (redirections, test capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout  # not setStream: it flushes the previous stream, which may be closed by now
        super().emit(record)


class _Stderr(logging.StreamHandler):
    """Everything but the progress lines, on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # not setStream: it flushes the previous stream, which may be closed by now
        super().emit(record)


def _is_progress(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] == LOGGER.name and record.levelno < logging.WARNING


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    """Progress (INFO of ``stfpm_ray``) as plain lines on stdout; other records at WARNING (DEBUG with
    ``verbose``) and up on stderr, with time and logger name. ``verbose`` also lets Ray's own output through
    (``STFPM_RAY_VERBOSE``, read when Ray starts); ``quiet`` keeps only warnings and errors."""
    os.environ[VERBOSE_VARIABLE] = "1" if verbose else "0"
    root = logging.getLogger()
    for logger in (root, LOGGER):
        for handler in [h for h in logger.handlers if isinstance(h, (_CurrentStdout, _Stderr))]:
            logger.removeHandler(handler)
    errors = _Stderr(sys.stderr)
    errors.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    errors.addFilter(lambda record: not _is_progress(record))
    errors.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.addHandler(errors)
    if verbose:
        root.setLevel(logging.DEBUG)
    progress = _CurrentStdout(sys.stdout)
    progress.setFormatter(logging.Formatter("%(message)s"))
    progress.addFilter(_is_progress)
    LOGGER.addHandler(progress)
    LOGGER.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
