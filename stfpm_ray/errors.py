"""User errors: wrong input, settings or output folders, or a damaged output. The CLI prints them as one line
and exits with the error's :attr:`~StfpmError.exit_code`.

Anything that is not a :class:`StfpmError` is a bug (or an environment failure) and keeps its traceback.
The subclasses also derive from the built-in exception they replace, so callers that catch ``ValueError``
or ``FileNotFoundError`` keep working.
"""

from __future__ import annotations


class StfpmError(Exception):
    """Base of every error that means "the user's input is wrong"; the message says what to do."""

    exit_code = 2


class UserError(StfpmError, ValueError):
    """A setting or input value that cannot work."""


class InputNotFoundError(StfpmError, FileNotFoundError):
    """An input path or URI that does not exist."""


class OutputExistsError(StfpmError, FileExistsError):
    """An output folder this run may not write into."""


class StorageError(StfpmError, OSError):
    """Storage that is damaged or out of reach (an object store that does not answer or refuses the
    credentials, a scores table with a file gone): not a bug, and not fixed by changing the command line, so it
    has an exit status of its own; the message names the location, what is wrong and what to do."""

    exit_code = 5


class TableError(StorageError):
    """A scores table that is damaged or out of reach (a data file gone, an unreadable log entry, no
    permission); the message names the ``stfpm-ray table`` command that mends it."""
