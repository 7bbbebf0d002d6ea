"""``stfpm-ray export``: each category's scoring model as one ONNX file (or OpenVINO's ``.xml`` + ``.bin``) plus a
JSON, for runtimes without stfpm-ray.

The steps:

1. **Check the checkpoints** as ``score`` does (:func:`~stfpm_ray.core.checkpoint.discover_checkpoints`). A
   selected category whose checkpoint is unusable stops the export before anything is written: an export is
   something to deploy, and a folder missing one category silently is worse than a clear refusal.
2. **Refuse existing files** in ``EXPORT_DIR`` unless ``--overwrite``.
3. **Export** the scoring model the actors use (:class:`~stfpm_ray.core.score.ScoringModels`: rewritten for
   inference, one teacher per backbone) through :func:`~stfpm_ray.core.export.export_onnx`.
4. **Check parity** on probe images of another batch size than the traced one (the batch is dynamic) in the
   format's runtime (onnxruntime, OpenVINO) against PyTorch (:func:`~stfpm_ray.core.exported.parity`); a graph
   that disagrees is not written.
5. **Write** ``<category>.onnx`` (or, with ``--format openvino``, the graph as OpenVINO's IR with fp32 weights,
   ``<category>.xml`` and ``.bin``) and ``<category>.json`` (:func:`~stfpm_ray.core.export.export_record`), each
   atomically, the JSON last.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stfpm_ray.core.checkpoint import CheckpointMeta, discover_checkpoints
from stfpm_ray.core.export import export_onnx, export_record, openvino_ir, require_runtime
from stfpm_ray.core.exported import check_parity
from stfpm_ray.core.score import ScoringModels
from stfpm_ray.errors import OutputExistsError, UserError
from stfpm_ray.progress import Progress, log_progress
from stfpm_ray.store.fs import is_file, resolve, write_bytes_atomic, write_text_atomic

# Export formats and the runtime that checks each against PyTorch before it is written.
FORMATS = {"onnx": "onnxruntime", "openvino": "openvino"}


def export_models(
    checkpoints: str | Path,
    out: str | Path,
    categories: Sequence[str] | None = None,
    fmt: str = "onnx",
    overwrite: bool = False,
    progress: Progress = log_progress,
) -> dict[str, dict[str, Any]]:
    """Export the checkpoints under ``checkpoints`` (all, or ``categories``) into ``out``; the JSON records."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require_runtime(FORMATS[fmt])
    selected = _selected(checkpoints, categories)
    target = resolve(out)
    existing = [name for name in selected for ext in (*_files(fmt), ".json") if is_file(target.join(f"{name}{ext}"))]
    if existing and not overwrite:
        raise OutputExistsError(f"{out} already holds exports of {', '.join(sorted(set(existing)))}; pass --overwrite")
    models = ScoringModels(selected)
    records = {}
    for name in sorted(selected):
        model, meta = models(name)
        graph = export_onnx(model, meta.input_size)
        check_parity(model, meta, graph, FORMATS[fmt])
        files = {".onnx": graph} if fmt == "onnx" else openvino_ir(graph)
        for ext, data in files.items():
            write_bytes_atomic(target.join(f"{name}{ext}"), data)
        records[name] = export_record(selected[name][0], meta, f"{name}{_files(fmt)[0]}", fmt)
        write_text_atomic(target.join(f"{name}.json"), json.dumps(records[name], indent=2, allow_nan=False) + "\n")
        progress(
            f"[{name}] {target.join(records[name]['model_file']).path} ({sum(map(len, files.values())) / 1e6:.1f} MB), "
            f"threshold {records[name]['threshold']:.4g} ({records[name]['operating_point']}), model {meta.model_id}"
        )
    return records


def _files(fmt: str) -> tuple[str, ...]:
    """The extensions of a category's model files in ``fmt``, the one the JSON names first."""
    return (".onnx",) if fmt == "onnx" else (".xml", ".bin")


def _selected(checkpoints: str | Path, categories: Sequence[str] | None) -> dict[str, tuple[str, CheckpointMeta]]:
    """The sound checkpoints of the chosen categories; any chosen one unusable or absent is refused."""
    found, problems = discover_checkpoints(checkpoints)
    names = list(categories) if categories else sorted({*found, *problems})
    if broken := [name for name in names if name in problems]:
        raise UserError("; ".join(f"the checkpoint of {name!r} is unusable: {problems[name]}" for name in broken))
    if absent := [name for name in names if name not in found]:
        have = ", ".join(sorted(found)) or "none"
        raise UserError(f"no checkpoint for {', '.join(map(repr, absent))} under {checkpoints} (have: {have})")
    return {name: found[name] for name in names}
