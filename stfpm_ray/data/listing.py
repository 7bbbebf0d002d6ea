"""Which files a scoring run reads: the inputs' image files as one sorted Arrow table of paths.

Listing happens on the driver, before anything is read, so that ``--incremental`` can drop already-scored
files first; it therefore has to survive whatever a real archive holds without reading a byte of it:

* Local folders are walked by hand (``os.scandir`` on bytes paths) rather than through pyarrow, whose
  recursive selector follows directory symlinks: a ``loop -> .`` link made it recurse until the path was
  too long. Directory symlinks are counted and not followed; file symlinks are followed, and a symlink
  to a file already listed (directly or through another symlink) is dropped, so the file is scored once.
  Hard links keep their rows: each is a name of its own.
* A file that cannot become a proper row (a dangling link, a name that is not UTF-8, which Arrow strings
  and Parquet cannot hold) becomes an error row: the user sees it in the output instead of losing it
  silently or losing the whole run to one bad name.
* FIFOs, sockets and devices are counted, never opened: opening a FIFO blocks until a writer comes.
* Rows go into Arrow record batches every :data:`CHUNK_ROWS` files: archives hold millions of files, and a
  Python object per file would cost the driver several times the Arrow bytes.

Other filesystems (``s3://``, ``gs://``, mounted pyarrow filesystems) have no symlinks or special files
and keep pyarrow's recursive listing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from stfpm_ray.data.images import IMAGE_EXTENSIONS
from stfpm_ray.data.mvtec import is_mask
from stfpm_ray.errors import InputNotFoundError, UserError
from stfpm_ray.store.fs import Location, list_dir, resolve

SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("source", pa.int32(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("error", pa.string()),
    ]
)
# Rows per record batch while listing: large enough that per-batch overhead vanishes, small enough that
# the Python lists of one batch stay a few MB.
CHUNK_ROWS = 65_536

SKIPPED_DIR_SYMLINKS = "directory symlinks not followed"
SKIPPED_SPECIAL = "FIFOs, sockets and devices"
SKIPPED_UNREADABLE = "unreadable folders"
SKIPPED_VANISHED = "files that vanished while listing"

NOT_UTF8_FILE = "file name is not valid UTF-8 (shown escaped); rename the file"
NOT_UTF8_FOLDER = "folder name is not valid UTF-8 (shown escaped); rename the folder"

# The walk's columns beside SCHEMA's: the real file's identity (null for error rows and non-local files),
# whether the name is a symlink, and the order rows were found in, which breaks ties between inputs.
_WORK_SCHEMA = pa.schema(
    list(SCHEMA)
    + [
        pa.field("dev", pa.uint64()),
        pa.field("ino", pa.uint64()),
        pa.field("link", pa.bool_()),
        pa.field("order", pa.int64()),
    ]
)
_SUFFIXES = tuple(ext.encode() for ext in IMAGE_EXTENSIONS)
_EXTENSIONS = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}


@dataclass
class Listing:
    """The files of a run and where to read them.

    ``files`` has one row per path (sorted): ``source`` indexes ``sources``, whose ``(filesystem, prefix)``
    reads ``path[len(prefix):]``; ``error`` is set when the file cannot be read (the row is then an error
    row of the output). ``skipped`` counts, by reason, the entries that were left out without a row.
    """

    files: pa.Table
    sources: list[tuple[pafs.FileSystem, str]]
    skipped: dict[str, int] = field(default_factory=dict)


class _Rows:
    """Rows gathered column by column and frozen into record batches, so no per-file dict ever exists."""

    def __init__(self) -> None:
        self.batches: list[pa.RecordBatch] = []
        self.skipped: dict[str, int] = {}
        self._columns: dict[str, list] = {name: [] for name in _WORK_SCHEMA.names}
        self._count = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(
        self,
        path: str,
        source: int,
        size: int,
        error: str | None = None,
        st: os.stat_result | None = None,
        link: bool = False,
    ) -> None:
        known = st is not None
        values = (
            path,
            source,
            size,
            error,
            st.st_dev if known else None,
            st.st_ino if known else None,
            link,
            self._count,
        )
        for column, value in zip(self._columns.values(), values):
            column.append(value)
        self._count += 1
        if len(self._columns["path"]) >= CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._columns["path"]:
            self.batches.append(pa.RecordBatch.from_pydict(self._columns, _WORK_SCHEMA))
            self._columns = {name: [] for name in _WORK_SCHEMA.names}

    def table(self) -> pa.Table:
        self._flush()
        return pa.Table.from_batches(self.batches, _WORK_SCHEMA)


def _first_of_runs(columns: Sequence[pa.ChunkedArray]) -> pa.Array:
    """True where a row differs from the one before it in any of ``columns`` (rows already sorted)."""
    n = len(columns[0])
    if n == 0:
        return pa.array([], pa.bool_())
    differs = pc.not_equal(columns[0].slice(1), columns[0].slice(0, n - 1))
    for column in columns[1:]:
        differs = pc.or_(differs, pc.not_equal(column.slice(1), column.slice(0, n - 1)))
    return pa.chunked_array([pa.array([True]), *differs.chunks], pa.bool_())


def _identity(table: pa.Table) -> pa.ChunkedArray:
    """``dev:ino`` as text: the real file a row reaches."""
    return pc.binary_join_element_wise(pc.cast(table["dev"], pa.string()), pc.cast(table["ino"], pa.string()), ":")


def _deduplicated(table: pa.Table) -> pa.Table:
    """One row per path (first found), and symlinks dropped when they reach a file already listed.

    Only symlinks are folded into their target: hard links are distinct names an archive may hold on
    purpose (deduplicating storage, one image filed under two cameras), so each keeps its row.
    """
    link = pc.fill_null(table["link"], False)
    known = pc.and_(pc.is_valid(table["ino"]), link)
    links, rest = table.filter(known), table.filter(pc.invert(known))
    links = links.filter(pc.invert(pc.is_in(_identity(links), value_set=_identity(rest).combine_chunks())))
    links = links.take(
        pc.sort_indices(
            links, [("dev", "ascending"), ("ino", "ascending"), ("path", "ascending"), ("order", "ascending")]
        )
    )
    links = links.filter(_first_of_runs([links["dev"], links["ino"]]))
    rows = pa.concat_tables([rest, links])
    rows = rows.take(pc.sort_indices(rows, [("path", "ascending"), ("order", "ascending")]))
    rows = rows.filter(_first_of_runs([rows["path"]]))
    return rows.select(SCHEMA.names).cast(SCHEMA).combine_chunks()


def _text(path: bytes) -> tuple[str, bool]:
    """The path as text, and whether it is valid UTF-8 (else it is shown with ``\\xNN`` escapes)."""
    try:
        return path.decode("utf-8"), True
    except UnicodeDecodeError:
        return path.decode("utf-8", "backslashreplace"), False


def _is_candidate(path: bytes) -> bool:
    """A folder entry worth a row by its name: an image extension, and not an MVTec mask."""
    return path.lower().endswith(_SUFFIXES) and not is_mask(path.decode("utf-8", "backslashreplace"))


def _follow(path: bytes) -> os.stat_result | OSError:
    """The target's status, or why there is none: callers turn each failure into a row or a message."""
    try:
        return os.stat(path)
    except OSError as exc:
        return exc


def _add_file(rows: _Rows, path: bytes, source: int, st: os.stat_result, link: bool) -> None:
    """A regular file's row; a path that is not UTF-8 is an error row, since no Arrow string can hold it."""
    text, valid = _text(path)
    if valid:
        rows.add(text, source, st.st_size, st=st, link=link)
    else:
        rows.add(text, source, 0, NOT_UTF8_FOLDER if _text(os.path.basename(path))[1] else NOT_UTF8_FILE)


def _add_link(rows: _Rows, path: bytes, source: int, target: os.stat_result | OSError) -> None:
    """A symlink that is not a folder's: its file, an error row when it leads nowhere, else a special file."""
    if isinstance(target, os.stat_result):
        if stat.S_ISREG(target.st_mode):
            _add_file(rows, path, source, target, True)
        else:
            rows.skip(SKIPPED_SPECIAL)
        return
    text = _text(path)[0]
    if isinstance(target, FileNotFoundError):
        try:
            pointee = _text(os.readlink(path))[0]
        except OSError:
            pointee = "unknown"
        rows.add(text, source, 0, f"dangling symbolic link (target: {pointee})")
    else:
        rows.add(text, source, 0, f"symbolic link cannot be followed: {target.strerror or target}")


def _entries(folder: bytes, rows: _Rows, top: bool) -> Iterator[os.DirEntry[bytes]]:
    """A folder's entries; an unreadable subfolder is counted rather than fatal, an unreadable input is not."""
    try:
        with os.scandir(folder) as it:
            yield from it
    except OSError as exc:
        if top:
            raise UserError(f"cannot read input folder {_text(folder)[0]}: {exc.strerror or exc}") from None
        rows.skip(SKIPPED_UNREADABLE)


def _walk_local(rows: _Rows, base: bytes, source: int) -> None:
    """Every image file below ``base``, depth first without recursion (an archive may be deep)."""
    pending = [(base, True)]
    while pending:
        folder, top = pending.pop()
        for entry in _entries(folder, rows, top):
            if entry.name.startswith(b"."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, False))
                    continue
                link = entry.is_symlink()
                target = _follow(entry.path) if link else None
                if isinstance(target, os.stat_result) and stat.S_ISDIR(target.st_mode):
                    rows.skip(SKIPPED_DIR_SYMLINKS)
                elif not _is_candidate(entry.path):
                    continue
                elif link:
                    _add_link(rows, entry.path, source, target)
                elif entry.is_file(follow_symlinks=False):
                    _add_file(rows, entry.path, source, entry.stat(follow_symlinks=False), False)
                else:
                    rows.skip(SKIPPED_SPECIAL)
            except FileNotFoundError:
                rows.skip(SKIPPED_VANISHED)
            except OSError as exc:  # one file the walk cannot inspect must not end a run over millions
                rows.add(_text(entry.path)[0], source, 0, f"cannot read file information: {exc.strerror or exc}")


def _list_local(rows: _Rows, uri: str, base: str, source: int) -> None:
    """One local input: a folder is walked, a file is taken whatever its extension."""
    raw = os.fsencode(base)
    target = _follow(raw)
    if isinstance(target, FileNotFoundError):
        dangling = " (a dangling symbolic link)" if os.path.islink(raw) else ""
        raise InputNotFoundError(f"input {uri} does not exist{dangling}")
    if isinstance(target, OSError):
        raise UserError(f"cannot read input {uri}: {target.strerror or target}")
    if stat.S_ISDIR(target.st_mode):
        _walk_local(rows, raw, source)
    elif stat.S_ISREG(target.st_mode):
        _add_file(rows, raw, source, target, os.path.islink(raw))
    else:
        rows.skip(SKIPPED_SPECIAL)


def _list_remote(rows: _Rows, uri: str, location: Location, source: int) -> None:
    """One input on a filesystem without symlinks or special files, through the storage layer's listing."""
    info = location.filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.File:
        rows.add(location.name, source, info.size or 0)
        return
    if info.type != pafs.FileType.Directory:
        raise InputNotFoundError(f"input {uri} does not exist")
    for entry in list_dir(location, recursive=True):
        if (
            entry.type == pafs.FileType.File
            and entry.extension.lower() in _EXTENSIONS
            and not any(part.startswith(".") for part in entry.path[len(location.path) :].split("/"))
            and not is_mask(entry.path)
        ):
            rows.add(location.prefix + entry.path, source, entry.size or 0)


def list_images(inputs: Sequence[str]) -> Listing:
    """Image files under the inputs (local paths or URIs), one row per path and per real file.

    An input that names a file is taken whatever its extension; in folders only image extensions (any
    letter case) count, and hidden entries and MVTec ground-truth masks are skipped. A missing input is an
    :class:`InputNotFoundError`: a typo must not pass for an empty archive.
    """
    rows = _Rows()
    sources: list[tuple[pafs.FileSystem, str]] = []
    for uri in inputs:
        location = resolve(uri)
        sources.append((location.filesystem, location.prefix))
        if isinstance(location.filesystem, pafs.LocalFileSystem) and not location.prefix:
            _list_local(rows, uri, location.path, len(sources) - 1)
        else:
            _list_remote(rows, uri, location, len(sources) - 1)
    return Listing(_deduplicated(rows.table()), sources, rows.skipped)
