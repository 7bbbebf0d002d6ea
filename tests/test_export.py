"""`stfpm-ray export` (stfpm_ray.workflows.export): one ONNX file and a JSON per category that score as the
PyTorch scoring model does, refusals like `score`'s, and the README's example run as written."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need, quiet

from stfpm_ray import cli
from stfpm_ray.core.checkpoint import validate_checkpoint
from stfpm_ray.core.export import export_record, installed
from stfpm_ray.core.exported import PARITY_TOLERANCE, onnx_session, parity, predict_onnx
from stfpm_ray.core.score import load_scoring_model
from stfpm_ray.data.images import load_image
from stfpm_ray.errors import OutputExistsError, UserError
from stfpm_ray.workflows.export import export_models

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> tuple[Path, str]:
    """The first trained category exported once for the module: (EXPORT_DIR, category)."""
    need(all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")), "needs stfpm-ray[onnx]")
    out = tmp_path_factory.mktemp("export")
    category = trained[1][0]
    export_models(trained[0], out, [category], progress=quiet)
    return out, category


def _test_images(synth_root: Path, category: str, size: int = 64) -> tuple[list[Path], torch.Tensor]:
    """The category's test images and, decoded as scoring decodes them, one uint8 NCHW batch."""
    paths = sorted((synth_root / category / "test").glob("*/*.png"))
    return paths, torch.from_numpy(np.stack([load_image(p, size) for p in paths])).permute(0, 3, 1, 2)


def test_the_json_records_the_operating_point_and_the_checkpoint(exported, trained):
    out, category = exported
    folder = trained[0] / category
    meta = validate_checkpoint(folder)
    record = json.loads((out / f"{category}.json").read_text())
    point = meta.operating_point
    digest = hashlib.sha256((folder / "student.safetensors").read_bytes() + (folder / "stfpm.json").read_bytes())
    assert record["threshold"] == point.threshold and record["target_far"] == point.target_far
    assert (record["image_size"], record["model_id"]) == (meta.image_size, meta.model_id)
    assert record["checkpoint_sha256"] == digest.hexdigest()
    assert record["model_file"] == f"{category}.onnx" and (out / record["model_file"]).stat().st_size > 1e6
    assert sorted(p.name for p in out.iterdir()) == [f"{category}.json", f"{category}.onnx"]


def test_a_checkpoint_without_a_recorded_target_exports_null(trained):
    """Checkpoints older than the calibration record have no target false-alarm rate: valid JSON says null."""
    folder = trained[0] / trained[1][0]
    record = export_record(folder, replace(validate_checkpoint(folder), calibration={}), "x.onnx")
    assert record["target_far"] is None and json.loads(json.dumps(record, allow_nan=False)) == record


def test_exported_scores_and_maps_match_pytorch_on_the_test_images(exported, trained, synth_root):
    """Parity on every test image of the category in one batch (not the traced batch of 2: the batch is dynamic)."""
    out, category = exported
    model, meta = load_scoring_model(str(trained[0] / category))
    paths, images = _test_images(synth_root, category)
    maps, scores = model.predict(images)
    session = onnx_session(str(out / f"{category}.onnx"))
    onnx_maps, onnx_scores = predict_onnx(session, images.numpy())
    assert onnx_maps.shape == (len(paths), 64, 64) and onnx_scores.shape == (len(paths),)
    check = parity((maps.numpy(), scores.numpy()), (onnx_maps, onnx_scores), meta.operating_point.threshold)
    assert check.holds, check
    assert check.tolerance == pytest.approx(PARITY_TOLERANCE * meta.operating_point.threshold)
    # the check can fail: a map off by twice the tolerance somewhere, or one decision flipped
    threshold = meta.operating_point.threshold
    assert not parity((maps.numpy(), scores.numpy()), (onnx_maps + 2 * check.tolerance, onnx_scores), threshold).holds
    flipped = scores.numpy().copy()
    flipped[0] = 0.0 if flipped[0] > threshold else 2 * threshold
    assert not parity((maps.numpy(), flipped), (onnx_maps, onnx_scores), threshold).same_flagged


def test_the_readme_example_flags_what_pytorch_flags(exported, trained, synth_root, tmp_path):
    out, category = exported
    section = README.read_text().split("\n## Export\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 20 and "stfpm_ray" not in code
    script = tmp_path / "score_folder.py"
    script.write_text(code)
    folder = tmp_path / "images"
    paths, images = _test_images(synth_root, category)
    folder.mkdir()
    for path in paths:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    run = subprocess.run(
        [sys.executable, str(script), str(out / f"{category}.json"), str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    printed = sorted(Path(line.split("\t")[0]).name for line in run.stdout.splitlines())
    model, meta = load_scoring_model(str(trained[0] / category))
    flagged = model.predict(images)[1] > meta.operating_point.threshold
    expected = sorted(f"{p.parent.name}_{p.name}" for p, hit in zip(paths, flagged.tolist()) if hit)
    assert printed == expected and 0 < len(expected) < len(paths)


def test_existing_exports_are_kept_without_overwrite(exported, trained):
    out, category = exported
    before = (out / f"{category}.onnx").stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_models(trained[0], out, [category], progress=quiet)
    assert (out / f"{category}.onnx").stat().st_mtime_ns == before


def test_a_broken_checkpoint_is_refused_before_anything_is_written(trained, tmp_path, capsys):
    checkpoints = Path(shutil.copytree(trained[0], tmp_path / "ckpt"))
    broken = trained[1][1]
    weights = checkpoints / broken / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    status = cli.main(["export", "--checkpoints", str(checkpoints), "--out", str(tmp_path / "export")])
    error = capsys.readouterr().err
    assert status == 2 and broken in error and "student.safetensors" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())
    with pytest.raises(UserError, match="no checkpoint for 'nope'"):
        export_models(checkpoints, tmp_path / "export", ["nope"], progress=quiet)


def test_a_missing_extra_is_one_line(trained, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    status = cli.main(["export", "--checkpoints", str(trained[0]), "--out", str(tmp_path / "export")])
    error = capsys.readouterr().err
    assert status == 2 and "pip install 'stfpm-ray[onnx]'" in error and len(error.splitlines()) == 1


def test_openvino_format_scores_as_pytorch_does(trained, synth_root, tmp_path):
    """``--format openvino``: the graph as OpenVINO's IR (.xml + .bin, weights kept fp32), read back by OpenVINO
    alone, scores every test image within the parity tolerance and flags what PyTorch flags."""
    need(installed("openvino"), "needs stfpm-ray[openvino]")
    import openvino as ov

    category = trained[1][0]
    out = tmp_path / "export"
    assert cli.main(["export", "--checkpoints", str(trained[0]), "--out", str(out), "--format", "openvino"]) == 0
    record = json.loads((out / f"{category}.json").read_text())
    assert record["format"] == "openvino" and record["model_file"] == f"{category}.xml"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(category)) == [
        f"{category}.bin",
        f"{category}.json",
        f"{category}.xml",
    ]
    model, meta = load_scoring_model(str(trained[0] / category))
    _, images = _test_images(synth_root, category)
    maps, scores = model.predict(images)
    compiled = ov.Core().compile_model(str(out / record["model_file"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(images.numpy())
    got = (result[compiled.output("anomaly_map")], result[compiled.output("score")])
    check = parity((maps.numpy(), scores.numpy()), got, meta.operating_point.threshold)
    assert check.holds, check
