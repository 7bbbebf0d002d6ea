"""The checkpoint format: one folder per category, student weights plus a JSON of metadata.

``student.safetensors`` holds the student's tensors (loading executes no pickle), ``stfpm.json`` holds what
is needed to rebuild the model and to trust its scores: format version, backbone, layers, image size,
teacher source and hash, the operating points (the threshold training calibrated, and those ``calibrate``
added later from good images of new conditions), normalisation, and training figures.
The teacher is never stored: it is rebuilt from its source and checked against the recorded hash. Folders
may be local paths or URIs: every byte goes through :mod:`stfpm_ray.store.fs`.

:func:`validate_checkpoint` and :func:`discover_checkpoints` check a folder on the driver, before any worker
starts, so that a broken checkpoint is one line naming the file instead of a traceback inside a worker.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import struct
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load, save

from stfpm_ray.core.calibration import OperatingPoint, later_point, training_point
from stfpm_ray.core.memory_bank import bank_channels
from stfpm_ray.core.model import STFPM
from stfpm_ray.core.students import DEFAULT_STUDENT, LEGACY_STUDENT, state_shapes
from stfpm_ray.core.teacher import OFFLINE_WEIGHTS, Teacher, load_teacher
from stfpm_ray.errors import InputNotFoundError, UserError
from stfpm_ray.store.fs import (
    Location,
    is_dir,
    is_file,
    is_uri,
    list_dir,
    read_bytes,
    resolve,
    write_bytes_atomic,
    write_text_atomic,
)

FORMAT_VERSION = 1
WEIGHTS_FILE = "student.safetensors"
META_FILE = "stfpm.json"
# The memory bank's tensor in WEIGHTS_FILE, beside the student's (a name no student parameter has).
MEMORY_KEY = "memory_bank"
# JSON types of the metadata fields: a hand-edited value of another type would otherwise fail in a worker
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "category": (str,),
    "backbone": (str,),
    "layers": (list,),
    "image_size": (int,),
    "input_shape": (list, type(None)),
    "teacher_source": (str,),
    "teacher_sha256": (str,),
    "threshold": (int, float),
    "normalization": (dict,),
    "training": (dict,),
    "combine": (str,),
    "student": (str,),
    "level_scales": (list, type(None)),
    "map_sigma": (int, float),
    "memory_bank": (int,),
    "memory_neighbours": (int,),
    "map_scales": (list, type(None)),
    "calibration": (dict,),
    "operating_points": (list,),
    "model_id": (str,),
    "format_version": (int,),
}
# bytes per element of the safetensors dtypes, to check that every tensor's byte range fits its shape
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


class CheckpointError(UserError):
    """A checkpoint folder that is missing, of another format, or made for another teacher."""


@dataclass
class CheckpointMeta:
    """Everything a scorer needs besides the weights; ``model_id`` identifies weights + the training threshold.

    ``threshold`` is the threshold training calibrated; the one in force (:attr:`operating_point`) is the newest
    of ``operating_points`` where ``calibrate`` added any, so that recalibrating changes decisions without
    changing ``model_id`` (rows already scored keep their identity and need no rescoring).
    """

    category: str
    backbone: str
    layers: list[int]
    image_size: int
    teacher_source: str
    teacher_sha256: str
    threshold: float
    normalization: dict[str, float]
    training: dict[str, Any] = field(default_factory=dict)
    # [height, width] of a model trained with the aspect kept on non-square images (core.input_size); None:
    # image_size x image_size, as every checkpoint written before the field existed.
    input_shape: list[int] | None = None
    # How levels combine into the map: product, or sum with these validation scales (core.anomaly_map).
    # Checkpoints written before the option existed lack both fields and score with the product.
    combine: str = "product"
    level_scales: list[float] | None = None
    # Gaussian smoothing of the map in pixels (core.anomaly_map.smooth_maps); checkpoints written before the
    # field existed lack it and score unsmoothed.
    map_sigma: float = 0.0
    # Rows of the memory of good teacher features (core.memory_bank), saved beside the student's weights as
    # MEMORY_KEY, and what the student's map and the memory's are divided by before they are averaged
    # (core.model.STFPM.opinion_scales). Checkpoints written before lack both: the student's map alone.
    memory_bank: int = 0
    # The nearest memory rows a position's distance averages; memories written before the field existed lack
    # it and use the nearest alone.
    memory_neighbours: int = 1
    map_scales: list[float] | None = None
    # Which student kind (stfpm_ray.core.students); read_meta takes a checkpoint written before the field
    # existed for the kind there was then, LEGACY_STUDENT.
    student: str = DEFAULT_STUDENT
    # How the threshold was set (stfpm_ray.core.fit.calibration): method, target false-alarm rate, number of
    # validation images, fitted parameters. Checkpoints written before lack it: their threshold is the
    # validation maximum, and they score with it unchanged.
    calibration: dict[str, Any] = field(default_factory=dict)
    # Operating points set after training from known-good images (stfpm_ray.core.calibration.new_point), oldest
    # first; the newest is in force.
    operating_points: list[dict[str, Any]] = field(default_factory=list)
    model_id: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the model scores images at."""
        return (self.input_shape[0], self.input_shape[1]) if self.input_shape else (self.image_size, self.image_size)

    @property
    def operating_history(self) -> list[OperatingPoint]:
        """Every operating point the checkpoint has had, training's first; the last one is in force."""
        return [training_point(self.threshold, self.calibration), *map(later_point, self.operating_points)]

    @property
    def operating_point(self) -> OperatingPoint:
        """The operating point in force: the one that decides ``is_anomalous``."""
        return self.operating_history[-1]


def _model_id(weights: bytes, meta: CheckpointMeta) -> str:
    digest = hashlib.sha256(weights)
    digest.update(f"{meta.teacher_sha256}:{meta.image_size}:{meta.threshold!r}".encode())
    if meta.input_shape:  # non-square input; square ones keep the identity they had before the field existed
        digest.update(f"shape:{meta.input_shape}".encode())
    if meta.level_scales is not None:  # the map itself depends on them
        digest.update(repr([float(v) for v in meta.level_scales]).encode())
    if meta.map_sigma:  # and on this
        digest.update(f"sigma:{float(meta.map_sigma)!r}".encode())
    if meta.map_scales is not None:  # and on these (the memory itself is in the weights' bytes)
        digest.update(f"scales:{[float(v) for v in meta.map_scales]!r}".encode())
    if meta.memory_neighbours != 1:
        digest.update(f"neighbours:{meta.memory_neighbours}".encode())
    return digest.hexdigest()[:16]


def save_checkpoint(
    folder: str | Path, student: torch.nn.Module, meta: CheckpointMeta, memory_bank: torch.Tensor | None = None
) -> CheckpointMeta:
    """Write weights (and the memory bank ``meta.memory_bank`` promises) and metadata into a folder or URI; the
    JSON is written last, and every file atomically, so the JSON marks completeness."""
    rows = 0 if memory_bank is None else len(memory_bank)
    if rows != meta.memory_bank:
        raise ValueError(f"the metadata promises a memory bank of {meta.memory_bank} rows, given {rows}")
    location = resolve(folder)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in student.state_dict().items()}
    if memory_bank is not None:
        state[MEMORY_KEY] = memory_bank.detach().float().cpu().contiguous()
    weights = save(state, metadata={"format_version": str(FORMAT_VERSION)})
    write_bytes_atomic(location.join(WEIGHTS_FILE), weights)
    meta.model_id = _model_id(weights, meta)
    write_text_atomic(location.join(META_FILE), _meta_json(meta))
    return meta


def _meta_json(meta: CheckpointMeta) -> str:
    """``stfpm.json``'s text. A square model's leaves ``input_shape`` out, so that builds older than the field
    (which refuse fields they do not know) still read it."""
    record = asdict(meta)
    for name, unset in (("input_shape", None), ("memory_bank", 0), ("memory_neighbours", 1), ("map_scales", None)):
        if record[name] == unset:
            del record[name]
    return json.dumps(record, indent=2, sort_keys=True)


def add_operating_point(folder: str | Path, meta: CheckpointMeta, record: dict[str, Any]) -> CheckpointMeta:
    """Put ``record`` in force as the checkpoint's newest operating point (the old ones stay, for the record).

    Only ``stfpm.json`` is rewritten, atomically; the weights and ``model_id`` stay as they are.
    """
    updated = replace(meta, operating_points=[*meta.operating_points, record])
    write_text_atomic(resolve(folder).join(META_FILE), _meta_json(updated))
    return updated


def _read(location: Location, what: str) -> bytes:
    """The file's bytes; a missing or unreadable file is a one-line :class:`CheckpointError` naming it."""
    if not is_file(location):
        raise CheckpointError(f"{location.name} is missing: {what}")
    try:
        return read_bytes(location)
    except OSError as exc:
        raise CheckpointError(f"{location.name} cannot be read: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    """Library messages can span lines; the CLI prints a user error as exactly one."""
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def _field_problem(raw: dict[str, Any]) -> str | None:
    """What is wrong with the set of fields and their JSON types, or None."""
    names = {f.name for f in fields(CheckpointMeta)}
    required = {f.name for f in fields(CheckpointMeta) if f.default is MISSING and f.default_factory is MISSING}
    if unexpected := sorted(set(raw) - names):
        return f"unexpected fields {unexpected}"
    if missing := sorted(required - set(raw)):
        return f"missing fields {missing}"
    wrong = [name for name, value in raw.items() if not isinstance(value, _FIELD_TYPES[name])]
    if isinstance(raw.get("layers"), list) and not all(type(v) is int for v in raw["layers"]):
        wrong.append("layers")
    if isinstance(shape := raw.get("input_shape"), list) and not (
        len(shape) == 2 and all(type(v) is int and v % 32 == 0 for v in shape) and min(shape) == raw.get("image_size")
    ):
        wrong.append("input_shape")
    for name in ("level_scales", "map_scales"):
        if isinstance(raw.get(name), list) and not all(isinstance(v, (int, float)) and v > 0 for v in raw[name]):
            wrong.append(name)
    if raw.get("memory_bank", 0) and not (isinstance(raw.get("map_scales"), list) and len(raw["map_scales"]) == 2):
        wrong.append("map_scales")
    rows, neighbours = raw.get("memory_bank", 0), raw.get("memory_neighbours", 1)
    if isinstance(rows, int) and isinstance(neighbours, int) and not 1 <= neighbours <= max(1, rows):
        wrong.append("memory_neighbours")
    if isinstance(raw.get("operating_points"), list) and not all(map(_is_operating_point, raw["operating_points"])):
        wrong.append("operating_points")
    if wrong:
        return f"fields of the wrong type {sorted(wrong)}"
    return None


def _is_operating_point(record: object) -> bool:
    """A record ``calibrate`` writes: an id, a source, a positive threshold and its target."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("id"), str)
        and isinstance(record.get("source"), str)
        and isinstance(record.get("method"), str)
        and isinstance(record.get("threshold"), (int, float))
        and record["threshold"] > 0
        and isinstance(record.get("target_far"), (int, float))
    )


def read_meta(folder: str | Path) -> CheckpointMeta:
    """Read and validate the metadata of a checkpoint folder.

    Every refusal names ``stfpm.json`` by its full path: it is the file the user has to look at or replace.
    """
    path = resolve(folder).join(META_FILE)
    data = _read(path, f"{folder} is not a checkpoint (train one with `stfpm-ray train`)")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not JSON ({_one_line(exc)})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path.name} holds a JSON {type(raw).__name__}, not a checkpoint's object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path.name} has checkpoint format version {version}; this stfpm-ray reads version {FORMAT_VERSION}"
        )
    if problem := _field_problem(raw):
        raise CheckpointError(f"{path.name} has {problem}")
    return CheckpointMeta(**{"student": LEGACY_STUDENT, **raw})


@cache
def _offline_teacher_sha256(backbone: str, layers: tuple[int, ...]) -> str:
    """The hash an offline teacher records (:func:`~stfpm_ray.core.teacher.state_dict_sha256`).

    It is the hash of the remapped features network, not of the packaged file (``OFFLINE_WEIGHTS``), so no
    table holds it: the packaged teacher is loaded once per process (0.15 s for Lite0), then only this
    string is kept.
    """
    return load_teacher(backbone, layers, "offline").sha256


def _check_architecture(meta: CheckpointMeta, meta_file: str) -> Mapping[str, tuple[int, ...]]:
    """Backbone and recorded teacher against what this installation can rebuild; the student's shapes."""
    try:
        shapes = dict(state_shapes(meta.student, meta.backbone, tuple(meta.layers)))
        if meta.memory_bank:
            shapes[MEMORY_KEY] = (meta.memory_bank, bank_channels(meta.backbone, meta.layers))
    except UserError as exc:  # unknown backbone or student, or layers it cannot return
        raise CheckpointError(f"{meta_file}: {_one_line(exc)}") from exc
    if meta.teacher_source == "offline":
        if meta.backbone not in OFFLINE_WEIGHTS:
            raise CheckpointError(
                f"{meta_file} records an offline teacher for {meta.backbone!r}, but offline weights exist only "
                f"for {', '.join(OFFLINE_WEIGHTS)}"
            )
        expected = _offline_teacher_sha256(meta.backbone, tuple(meta.layers))
        if meta.teacher_sha256 != expected:
            raise CheckpointError(
                f"{meta_file} records teacher sha256 {meta.teacher_sha256[:12]}, but the packaged offline "
                f"{meta.backbone} teacher hashes to {expected[:12]}: trained against another teacher, its scores "
                "would be meaningless"
            )
    return shapes


def _tensor_shapes(data: bytes, name: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, parsed by hand: nothing is materialised or unpickled.

    Layout: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``,
    then the tensor bytes; every byte range must lie inside the file and fit its dtype and shape.
    """

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{name} is not a safetensors file ({why}); checkpoints never hold pickles")

    length = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    if not 0 <= length <= len(data) - 8:
        raise refuse("no safetensors header")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise refuse(f"header is not JSON: {_one_line(exc)}") from exc
    if not isinstance(header, dict):
        raise refuse("header is not a JSON object")
    body, shapes = len(data) - 8 - length, {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            size, shape, (begin, end) = _DTYPE_BYTES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            fits = 0 <= begin <= end <= body and end - begin == size * math.prod(shape)
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            raise refuse(f"tensor {key!r} has a malformed or truncated entry")
        shapes[key] = tuple(shape)
    return shapes


def _shape_problem(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """The first few names or shapes that differ from the student's, or None."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        return f"{len(missing)} missing tensors (first: {missing[:3]}), {len(extra)} unexpected (first: {extra[:3]})"
    wrong = [f"{k} {list(found[k])} != {list(expected[k])}" for k in sorted(expected) if found[k] != expected[k]]
    return f"{len(wrong)} tensors of the wrong shape (first: {wrong[:3]})" if wrong else None


def _check_weights(location: Location, meta: CheckpointMeta, expected: Mapping[str, tuple[int, ...]]) -> None:
    """The weights file: present, safetensors, the student's tensors, and the bytes ``model_id`` was made from."""
    weights = location.join(WEIGHTS_FILE)
    data = _read(weights, "the student's weights are not in this checkpoint")
    if problem := _shape_problem(_tensor_shapes(data, weights.name), expected):
        raise CheckpointError(
            f"{weights.name} does not hold a {meta.student} {meta.backbone} student with layers {meta.layers}: "
            f"{problem}"
        )
    if _model_id(data, meta) != meta.model_id:
        raise CheckpointError(
            f"{weights.name} does not match model_id {meta.model_id!r} of {location.join(META_FILE).name}: weights "
            "were replaced after training (or that file's threshold, image size, teacher hash or level scales "
            "were edited)"
        )


def validate_checkpoint(folder: str | Path) -> CheckpointMeta:
    """Check everything a worker would trip over, cheaply and on the driver; the metadata if sound.

    Fast (about 7 ms for a 12 MB Lite0 checkpoint; the first of a backbone pays 0.15 s more): the expected
    tensor shapes come from a student built on torch's meta device, and the offline teacher's hash from one
    teacher load, both cached per (backbone, layers); the weights are read once, their header parsed by hand
    (no tensor is built) and their bytes hashed once for ``model_id``. Every refusal is a
    :class:`CheckpointError` of one line that names the offending file.
    """
    meta = read_meta(folder)
    _check_contents(resolve(folder), meta)
    return meta


def _check_contents(location: Location, meta: CheckpointMeta) -> None:
    """All checks after the metadata was read, so a caller holding the metadata keeps it on failure."""
    expected = _check_architecture(meta, location.join(META_FILE).name)
    _check_weights(location, meta, expected)


def _is_candidate(location: Location) -> bool:
    return is_file(location.join(META_FILE)) or is_file(location.join(WEIGHTS_FILE))


def _candidate_folders(root: str | Path) -> list[Location]:
    """The root itself when it is one checkpoint, else its subfolders that look like checkpoints.

    A folder counts when it holds either file, so a half-written or gutted checkpoint is reported rather than
    silently skipped; ``_``/``.`` folders hold run state (``_ray``) and staging copies, never checkpoints.
    """
    location = resolve(root)
    if not is_dir(location):
        raise InputNotFoundError(f"checkpoint folder {root} does not exist (train one with `stfpm-ray train`)")
    if _is_candidate(location):
        return [location]
    folders = [
        location.at(entry.path)
        for entry in list_dir(location)
        if entry.type == pafs.FileType.Directory and not entry.base_name.startswith(("_", "."))
    ]
    folders = [folder for folder in folders if _is_candidate(folder)]
    if not folders:
        raise InputNotFoundError(f"no checkpoints under {root}: expected {root}/<category>/{META_FILE}")
    return folders


def _examine(location: Location, name: str) -> tuple[str, CheckpointMeta | None, str | None]:
    """``(category, meta, problem)`` of one folder; the folder name stands in for an unreadable category."""
    try:
        meta = read_meta(name)
    except CheckpointError as exc:
        return posixpath.basename(location.path.rstrip("/")), None, str(exc)
    try:
        _check_contents(location, meta)
    except CheckpointError as exc:
        return meta.category, meta, str(exc)
    return meta.category, meta, None


def discover_checkpoints(
    root: str | Path,
) -> tuple[dict[str, tuple[str, CheckpointMeta]], dict[str, str]]:
    """``({category: (folder, meta)}, {category: problem})`` from ``CKPT_DIR/<category>/`` or one folder.

    Every folder is validated (:func:`validate_checkpoint`; fast, see there) so a caller can score the sound
    categories and report each broken one in one line, instead of failing on the first. A folder whose
    metadata cannot be read goes by its folder name. Two folders for one category are refused outright
    (:class:`UserError`), sound or not: which one is meant is the user's choice.
    """
    valid: dict[str, tuple[str, CheckpointMeta]] = {}
    problems: dict[str, str] = {}
    seen: dict[str, str] = {}
    for location in _candidate_folders(root):
        name = location.name if is_uri(str(root)) else os.path.realpath(location.path)
        category, meta, problem = _examine(location, name)
        if category in seen:
            raise UserError(f"two checkpoints for category {category!r}: {seen[category]} and {name}")
        seen[category] = name
        if problem is not None:
            problems[category] = problem
        elif meta is not None:
            valid[category] = (name, meta)
    return valid, problems


def load_checkpoint(
    folder: str | Path, teacher: Teacher | None = None, device: str | torch.device = "cpu"
) -> tuple[STFPM, CheckpointMeta]:
    """Rebuild the model of a checkpoint, refusing one whose teacher or backbone does not match.

    Pass ``teacher`` to share one loaded teacher between the students of many categories.
    """
    meta = read_meta(folder)
    if teacher is None:
        teacher = load_teacher(meta.backbone, tuple(meta.layers), meta.teacher_source)
    if (teacher.backbone, tuple(teacher.layers)) != (meta.backbone, tuple(meta.layers)):
        raise CheckpointError(
            f"{folder} is a {meta.backbone} student with layers {meta.layers}; the teacher at hand is "
            f"{teacher.backbone} with layers {list(teacher.layers)}"
        )
    if teacher.sha256 != meta.teacher_sha256:
        raise CheckpointError(
            f"{folder} was trained against teacher {meta.teacher_source} ({meta.teacher_sha256[:12]}), "
            f"but the teacher at hand is {teacher.source} ({teacher.sha256[:12]}); scores would be meaningless"
        )
    model = STFPM(teacher, meta.backbone, meta.layers, student=meta.student)
    model.level_scales = tuple(meta.level_scales) if meta.level_scales is not None else None
    model.map_sigma = float(meta.map_sigma)
    state = load(read_bytes(resolve(folder).join(WEIGHTS_FILE)))
    if MEMORY_KEY in state:
        model.memory_bank = state.pop(MEMORY_KEY)
        model.map_scales = tuple(meta.map_scales) if meta.map_scales is not None else None
        model.memory_neighbours = meta.memory_neighbours
    try:
        model.student.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0][:300]
        raise CheckpointError(f"{folder}: student weights do not fit backbone {meta.backbone!r} ({detail})") from exc
    return model.to(device).eval(), meta
