"""The one storage layer: local paths and URIs (``s3://``, ``gs://``, ``file://``, ...) through pyarrow filesystems.

Every byte the project reads or writes outside Ray's own storage goes through here, and every folder it
lists: training data, scoring inputs and output, MVTec masks, checkpoints, leases, reports. A location is
``(filesystem, path inside it, prefix)``; ``prefix + path`` is the stable name that output rows record
(``s3://bucket/key``, or an absolute local path). One exception, on purpose: scoring inputs on local disk are
walked by :mod:`stfpm_ray.data.listing` with ``os.scandir``, because pyarrow's local listing follows
directory symlinks (a ``loop -> .`` link made it recurse without end) and cannot report dangling links.

:func:`register_filesystem` mounts any pyarrow filesystem under a URI scheme of its own (tests use it to reach
a local folder through a ``SubTreeFileSystem`` exactly as they would reach a bucket).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath

import pyarrow as pa
import pyarrow.fs as pafs

from stfpm_ray.errors import InputNotFoundError, StorageError, UserError

_MOUNTS: dict[str, pafs.FileSystem] = {}
# The object-store buckets this process has reached once (scheme://bucket): each is probed on first use only.
_REACHED: set[str] = set()


def is_uri(location: str) -> bool:
    """True for ``scheme://...``; everything else is a local path."""
    return "://" in str(location)


def register_filesystem(scheme: str, filesystem: pafs.FileSystem) -> None:
    """Resolve ``scheme://path`` to ``path`` inside ``filesystem`` in this process."""
    _MOUNTS[scheme] = filesystem


@dataclass(frozen=True)
class Location:
    """A resolved path: ``filesystem`` and ``path`` inside it; ``prefix + path`` names it for people and rows."""

    filesystem: pafs.FileSystem
    path: str
    prefix: str = ""

    @property
    def name(self) -> str:
        return self.prefix + self.path

    def join(self, *parts: str) -> Location:
        return Location(self.filesystem, posixpath.join(self.path, *parts), self.prefix)

    def at(self, path: str) -> Location:
        """Another path inside the same filesystem (a listed entry's), named with the same prefix."""
        return Location(self.filesystem, path, self.prefix)


def resolve(location: str | os.PathLike[str]) -> Location:
    """The :class:`Location` of a local path or a URI; a URI pyarrow cannot open is a :class:`UserError`."""
    text = str(location)
    if not is_uri(text):
        return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text)))
    scheme, rest = text.split("://", 1)
    if scheme in _MOUNTS:
        return Location(_MOUNTS[scheme], rest.rstrip("/"), f"{scheme}://")
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise UserError(f"cannot open {text}: {exc}") from None
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Location(filesystem, path)
    location = Location(filesystem, path.rstrip("/"), f"{scheme}://")
    _probe(location)
    return location


def _probe(location: Location) -> None:
    """Refuse an object store that does not answer or refuses the credentials in one line, once per bucket.

    pyarrow reports it from whichever call meets it first (a lease, a listing, a write task) as an OSError with
    the SDK's text; asking once here, before any work, gives one message with what to check instead.
    """
    bucket = location.prefix + location.path.split("/", 1)[0]
    if bucket in _REACHED:
        return
    try:
        location.filesystem.get_file_info(location.path)
    except OSError as exc:
        reason = str(exc).splitlines()[0]
        raise StorageError(
            f"cannot reach {location.name}: {reason}. Check the endpoint and the credentials (README: Object "
            "storage lists the environment variables)"
        ) from None
    _REACHED.add(bucket)


def file_type(location: str | os.PathLike[str] | Location) -> pafs.FileType:
    loc = location if isinstance(location, Location) else resolve(location)
    return loc.filesystem.get_file_info(loc.path).type


def is_file(location: str | os.PathLike[str] | Location) -> bool:
    return file_type(location) == pafs.FileType.File


def is_dir(location: str | os.PathLike[str] | Location) -> bool:
    return file_type(location) == pafs.FileType.Directory


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """A child of a local path or URI, as text in the same form: ``s3://b/data`` + ``x`` is ``s3://b/data/x``,
    ``data`` + ``x`` stays the relative ``data/x``, as :class:`pathlib.PurePath` writes it (so that names
    derived from user input keep its form)."""
    text = str(location)
    if is_uri(text):
        return "/".join([text.rstrip("/"), *parts])
    return str(PurePath(text, *parts))


def list_dir(location: str | os.PathLike[str] | Location, recursive: bool = False) -> list[pafs.FileInfo]:
    """The entries of a folder (everything below it with ``recursive``), sorted by path; none for a folder
    that does not exist. Entries' ``path`` is inside the folder's filesystem (see :meth:`Location.at`)."""
    loc = location if isinstance(location, Location) else resolve(location)
    if file_type(loc) != pafs.FileType.Directory:
        return []
    entries = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, recursive=recursive))
    return sorted(entries, key=lambda entry: entry.path)


def remove_empty(locations: Iterable[Location]) -> None:
    """Delete each of these folders that exists and is empty, in order (children before their parents)."""
    for loc in locations:
        if is_dir(loc) and not list_dir(loc):
            loc.filesystem.delete_dir(loc.path)


def open_input(location: str | os.PathLike[str] | Location) -> pa.NativeFile:
    """A seekable reader of the file, for readers that need part of it (an image's header); a missing file is an
    :class:`InputNotFoundError`, other I/O problems stay ``OSError``."""
    loc = location if isinstance(location, Location) else resolve(location)
    try:
        return loc.filesystem.open_input_file(loc.path)
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"{loc.name} does not exist") from exc


def read_bytes(location: str | os.PathLike[str] | Location) -> bytes:
    """The whole file (:func:`open_input`)."""
    with open_input(location) as handle:
        return handle.read()


def write_bytes_atomic(location: str | os.PathLike[str] | Location, data: bytes) -> None:
    """Write to a temporary sibling, then rename: a reader never sees half a file (object stores write
    whole objects anyway). Parent folders are created."""
    loc = location if isinstance(location, Location) else resolve(location)
    loc.filesystem.create_dir(posixpath.dirname(loc.path), recursive=True)
    staged = f"{loc.path}.{uuid.uuid4().hex[:8]}.tmp"
    with loc.filesystem.open_output_stream(staged) as handle:
        handle.write(data)
    loc.filesystem.move(staged, loc.path)


def write_text_atomic(location: str | os.PathLike[str] | Location, text: str) -> None:
    write_bytes_atomic(location, text.encode("utf-8"))


def read_text(location: str | os.PathLike[str] | Location) -> str:
    return read_bytes(location).decode("utf-8")
