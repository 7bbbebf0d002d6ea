"""What a scoring run reads: listed files routed to categories, minus what is already scored, in blocks.

Planning runs on the driver, before any image is read, so that a night over an archive of millions costs
what arrived since the last night: ``--incremental`` drops the files that already have an ``ok`` row for
their category's model (the table answers that, :meth:`stfpm_ray.store.scores.ScoresTable.already_scored`),
and only the rest are looked at more closely (label, defect and mask from the MVTec layout). A file that
will not be scored for a reason known now (a listing problem, no usable checkpoint, an oversized file)
keeps its place in the plan with an ``error``, so that it becomes an error row rather than vanishing.

:func:`decode_block` is the next step, run in parallel tasks: it reads and decodes one planned block to
uint8 pixels at the size of its category's model, so full-resolution pixels never leave the task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from stfpm_ray.data.images import ImageDecodeError, decode_image
from stfpm_ray.data.listing import Listing
from stfpm_ray.data.mvtec import category_for, is_training_image, sample_for
from stfpm_ray.store.scores import SAMPLE_FIELDS

SPLITS = ("test", "all")
# Files larger than this are refused unread: 100 MP (the decoder's pixel limit) of uncompressed RGB is
# 300 MB, so a bigger file is not an inspection image, and reading it whole could exhaust a worker.
MAX_FILE_BYTES = 512 * 1024 * 1024

# The rows of a plan: a sample's fields, where to read it, and what decoding needs.
PLAN_SCHEMA = pa.schema(
    SAMPLE_FIELDS
    + [
        pa.field("source", pa.int32()),
        pa.field("size", pa.int64()),
        pa.field("input_height", pa.int32()),
        pa.field("input_width", pa.int32()),
        pa.field("error", pa.string()),
    ]
)
# A decoded block: the plan's rows without where they were read from, plus HxWx3 uint8 pixels.
DECODED_SCHEMA = pa.schema(
    [field for field in PLAN_SCHEMA if field.name not in ("source", "size")] + [("pixels", pa.binary())]
)


class Model(Protocol):
    """What planning needs of a category's model (a checkpoint's metadata has both)."""

    model_id: str
    input_size: tuple[int, int]


@dataclass
class CategoryCounts:
    """One category in one run: rows scored, rows written as errors, images skipped as already scored."""

    ok: int = 0
    error: int = 0
    skipped: int = 0


@dataclass
class Plan:
    """Blocks of files to read (one decode task each) and, per category, how many were skipped."""

    blocks: list[pa.Table]
    counts: dict[str, CategoryCounts] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return sum(block.num_rows for block in self.blocks)

    @property
    def skipped(self) -> int:
        return sum(counts.skipped for counts in self.counts.values())

    @property
    def skipped_by_category(self) -> dict[str, int]:
        return {name: counts.skipped for name, counts in self.counts.items()}

    @property
    def categories(self) -> set[str]:
        """The categories with images to read (rows already known to fail included)."""
        return {name for block in self.blocks for name in block["category"].unique().to_pylist()}

    @property
    def paths(self) -> pa.ChunkedArray:
        """Every planned path, once: what the run must write exactly one row for."""
        return pa.chunked_array([chunk for block in self.blocks for chunk in block["path"].chunks], pa.string())


def _row_error(
    listed: str | None, category: str, size: int, models: Mapping[str, Model], problems: Mapping[str, str]
) -> str | None:
    """Why a planned file will not be scored, or None: listing problem, broken or missing checkpoint, size."""
    if listed is not None:
        return listed
    if category in problems:
        return f"checkpoint of category {category!r} is unusable: {problems[category]}"
    if category not in models:
        return f"no checkpoint for category {category!r} (have: {', '.join(sorted(models))})"
    if size > MAX_FILE_BYTES:
        return f"file of {size} bytes exceeds the limit of {MAX_FILE_BYTES} bytes"
    return None


def plan(
    listing: Listing,
    models: Mapping[str, Model],
    problems: Mapping[str, str],
    category: str | None,
    scored: Callable[[pa.Table], pa.Array] | None,
    block_rows: int,
    split: str = "test",
) -> Plan:
    """Route files to categories, drop those that already have an ok row for their model, cut the rest in blocks.

    ``category`` routes every file to one category (a plain archive folder); None routes by the MVTec
    layout, and ``split="test"`` then leaves out ``train/`` (what the models learnt from). ``problems``
    names the categories whose checkpoint is unusable: their files become error rows instead of failing
    the run. ``scored`` answers, for a table of ``(path, model_id)``, which already have an ok row.
    """
    files = listing.files
    if category is None and split == "test":
        training = pa.array([is_training_image(p) for p in files["path"].to_pylist()], pa.bool_())
        files = files.filter(pc.invert(training))
    paths = files["path"].to_pylist()
    categories = [category_for(path, category) for path in paths]
    model_ids = [models[name].model_id if name in models else None for name in categories]
    keys = pa.table({"path": files["path"], "model_id": pa.array(model_ids, pa.string())})
    skip = (scored(keys) if scored else pa.array([False] * len(paths))).to_pylist()
    sources, sizes, errors = (files[name].to_pylist() for name in ("source", "size", "error"))
    counts: dict[str, CategoryCounts] = {}
    rows = []
    for i, model_id in enumerate(model_ids):
        tally = counts.setdefault(categories[i], CategoryCounts())
        if skip[i]:
            tally.skipped += 1
            continue
        sample = sample_for(paths[i], category)  # label, defect and mask: only for what will be scored
        height, width = models[sample.category].input_size if model_id else (0, 0)
        rows.append(
            {
                "path": paths[i],
                "source": sources[i],
                "size": sizes[i],
                "category": sample.category,
                "label": sample.label,
                "defect": sample.defect,
                "mask_path": sample.mask_path,
                "model_id": model_id,
                "input_height": height,
                "input_width": width,
                "error": _row_error(errors[i], sample.category, sizes[i], models, problems),
            }
        )
    table = pa.Table.from_pylist(rows, PLAN_SCHEMA)
    return Plan([table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)], counts)


def decode_block(block: pa.Table, sources: list[tuple[pafs.FileSystem, str]]) -> pa.Table:
    """Read and decode a planned block to uint8 pixels at each row's model size (:data:`DECODED_SCHEMA`).

    A file that cannot be read or decoded (empty, truncated, not an image, decompression bomb, vanished)
    gets an error instead of pixels; nothing here fails the block.
    """
    pixels: list[bytes | None] = []
    errors = block.column("error").to_pylist()
    paths, source_ids, heights, widths = (
        block[name].to_pylist() for name in ("path", "source", "input_height", "input_width")
    )
    for i, (path, source, size) in enumerate(zip(paths, source_ids, zip(heights, widths))):
        if errors[i] is not None:
            pixels.append(None)
            continue
        filesystem, prefix = sources[source]
        try:
            with filesystem.open_input_file(path[len(prefix) :]) as handle:
                data = handle.read()
            pixels.append(decode_image(data, size).tobytes())
        except ImageDecodeError as exc:
            pixels.append(None)
            errors[i] = str(exc)
        except OSError as exc:  # pyarrow's I/O errors: missing, vanished, unreadable files
            pixels.append(None)
            errors[i] = f"cannot read file: {exc}"
        except Exception as exc:  # a decoder bug on one odd file must not fail the night's job
            pixels.append(None)
            errors[i] = f"unexpected error while decoding: {type(exc).__name__}: {exc}"
    columns = {name: block.column(name) for name in DECODED_SCHEMA.names if name not in ("error", "pixels")}
    return pa.table({**columns, "error": errors, "pixels": pixels}, schema=DECODED_SCHEMA)
