"""User errors: wrong input, settings or output folders. The CLI prints them as one line.

Anything that is not a :class:`StfpmError` is a bug (or an environment failure) and keeps its traceback.
The subclasses also derive from the built-in exception they replace, so callers that catch ``ValueError``
or ``FileNotFoundError`` keep working.
"""

from __future__ import annotations


class StfpmError(Exception):
    """Base of every error that means "the user's input is wrong"; the message says what to do."""


class UserError(StfpmError, ValueError):
    """A setting or input value that cannot work."""


class InputNotFoundError(StfpmError, FileNotFoundError):
    """An input path or URI that does not exist."""


class OutputExistsError(StfpmError, FileExistsError):
    """An output folder this run may not write into."""
