"""Non-square categories keep their aspect ratio end to end: the input size training picks from the images,
the pixels the model sees, the stored maps, pixel metrics against masks of that shape, and the exported graph."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import read_scores
from PIL import Image

from stfpm_ray import cli
from stfpm_ray.core.checkpoint import read_meta
from stfpm_ray.core.fit import TrainConfig, prepare_category
from stfpm_ray.core.input_size import MAX_ASPECT, category_aspect, input_size
from stfpm_ray.data import images
from stfpm_ray.data.images import decode_image, image_aspect
from stfpm_ray.data.synth import generate_dataset
from stfpm_ray.errors import UserError
from stfpm_ray.store.mapcodec import decode_map

TALL_ROWS = 160  # 64 px wide synthetic images stacked to 64 x 160: height/width 2.5


@pytest.mark.parametrize(
    ("aspect", "expected"),
    [
        (1.0, (256, 256)),
        (1.03, (256, 256)),
        (2.5, (640, 256)),
        (0.4, (256, 640)),
        (1.5, (384, 256)),
        (10.0, (1024, 256)),
    ],
)
def test_the_short_side_is_the_image_size_and_the_long_side_follows(aspect, expected):
    assert input_size(256, aspect) == expected
    assert max(input_size(64, 100.0)) == MAX_ASPECT * 64 and input_size(32, 2.5) == (96, 32)  # 80 rounds up


def _png(path: Path, width: int, height: int, orientation: int | None = None) -> None:
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.new("RGB", (width, height), (90, 90, 90)).save(path, exif=exif.tobytes())


def test_the_category_aspect_is_the_median_as_decoded(tmp_path):
    _png(tmp_path / "a.png", 100, 250)
    _png(tmp_path / "b.png", 100, 200)
    _png(tmp_path / "c.png", 300, 100, orientation=6)  # stored wide, shown tall (rotated 90 degrees): 3.0
    (tmp_path / "d.png").write_bytes(b"not an image")
    assert image_aspect(tmp_path / "c.png") == 3.0 and image_aspect(tmp_path / "d.png") is None
    assert category_aspect(sorted(tmp_path.iterdir())) == 2.5
    assert category_aspect([tmp_path / "d.png"]) == 1.0


def test_a_category_of_upright_and_lying_images_stays_square(tmp_path):
    for i in range(10):
        _png(tmp_path / f"up{i}.png", 100, 150)
    for i in range(3):
        _png(tmp_path / f"lying{i}.png", 150, 100)
    paths = sorted(tmp_path.iterdir())
    assert category_aspect(paths) == 1.0
    assert category_aspect([p for p in paths if p.name.startswith("up")] + paths[:1]) == 1.5  # one odd image


def _stack(image: Image.Image) -> Image.Image:
    """A tall copy: the image, its vertical flip and the image again, cut to TALL_ROWS rows."""
    array = np.asarray(image)
    return Image.fromarray(np.concatenate([array, array[::-1], array])[:TALL_ROWS])


@pytest.fixture(scope="module")
def tall_root(tmp_path_factory) -> Path:
    """One synthetic category with every image and mask stacked to 64 x 160 (defects stack with their masks)."""
    root = tmp_path_factory.mktemp("tall")
    generate_dataset(root, categories=1, size=64, n_train=10, n_test=6, seed=4)
    for path in root.rglob("*.png"):
        with Image.open(path) as image:
            tall = _stack(image.copy())
        tall.save(path)
    return root


def test_training_decodes_at_the_kept_aspect_or_squashes_when_asked(tall_root):
    category = next(p.name for p in tall_root.iterdir())
    kept, _, _ = prepare_category(tall_root, category, TrainConfig(image_size=32, weights="offline"))
    square, _, _ = prepare_category(tall_root, category, TrainConfig(image_size=32, aspect="square", weights="offline"))
    assert tuple(kept.shape[-2:]) == (96, 32) and tuple(square.shape[-2:]) == (32, 32)
    with pytest.raises(UserError, match="aspect must be one of keep, square"):
        TrainConfig(aspect="stretch")


@pytest.mark.slow
def test_a_tall_category_trains_scores_evaluates_and_exports_at_its_aspect(ray_session, tall_root, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--epochs", "1", "--image-size", "32", "--batch-size", "4", "--map-size", "16"]
    assert cli.main(["benchmark", "--data", str(tall_root), "--out", str(out), *flags]) == 0
    (folder,) = [p for p in (out / "checkpoints").iterdir() if not p.name.startswith("_")]
    meta = read_meta(folder)
    assert f"[{meta.category}] images resized to 96x32 px (height x width)" in capsys.readouterr().out
    assert meta.input_shape == [96, 32] and meta.input_size == (96, 32) and meta.image_size == 32

    rows = read_scores(out / "scores")
    assert (rows["status"] == "ok").all() and len(rows) == 6
    shapes = {decode_map(png, scale).shape for png, scale in zip(rows["anomaly_map"], rows["map_scale"])}
    assert shapes == {(48, 16)}  # short side --map-size, aspect kept
    entry = json.loads((out / "report" / "metrics.json").read_text())["categories"][meta.category]
    assert entry["map_shape"] == [48, 16] and entry["map_size"] == 16 and 0.0 <= entry["pixel_auroc"] <= 1.0

    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    assert cli.main(["export", "--checkpoints", str(out / "checkpoints"), "--out", str(tmp_path / "export")]) == 0
    spec = json.loads((tmp_path / "export" / f"{meta.category}.json").read_text())
    assert (spec["input"]["height"], spec["input"]["width"]) == (96, 32)
    session = ort.InferenceSession(str(tmp_path / "export" / spec["model_file"]), providers=["CPUExecutionProvider"])
    batch = np.zeros((2, 3, 96, 32), dtype=np.uint8)
    score, anomaly_map = session.run(None, {spec["input"]["name"]: batch})
    assert score.shape == (2,) and anomaly_map.shape == (2, 96, 32)


def test_a_turned_jpeg_is_reduced_against_its_stored_axes(tmp_path):
    """A JPEG shown 640 px tall but stored on its side (EXIF orientation 6) must reach a 640 x 256 model at full
    height: reduced against the shown axes, not the stored ones, which would halve its height and blur it back."""
    shown = np.zeros((640, 1600, 3), dtype=np.uint8)
    shown[320:] = 255  # a sharp horizontal edge on a JPEG block boundary
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(buffer.getvalue(), (640, 256)).astype(float)
    rows = decoded.mean(axis=(1, 2))
    assert rows[:300].max() < 10 and rows[340:].min() > 245
    assert ((rows > 30) & (rows < 225)).sum() == 0  # no blurred rows: the height was never reduced


def test_the_aspect_of_a_large_png_is_read_from_its_first_bytes(tmp_path, monkeypatch):
    """The category's aspect must not cost a second download (or a decode) of its training images."""
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.png")  # about 4.5 MB, incompressible

    class Counted(io.RawIOBase):
        def __init__(self, path) -> None:
            self.file, self.count = open(path, "rb", buffering=0), 0  # noqa: SIM115 - closed with the reader

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            read = self.file.readinto(buffer)
            self.count += read
            return read

        def seek(self, offset: int, whence: int = 0) -> int:
            return self.file.seek(offset, whence)

        def close(self) -> None:
            self.file.close()
            super().close()

    opened: list[Counted] = []
    monkeypatch.setattr(images, "open_input", lambda path: opened.append(Counted(path)) or opened[-1])
    assert image_aspect(tmp_path / "big.png") == 1.5
    assert opened[0].count <= 2 * 65536
