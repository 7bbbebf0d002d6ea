"""The synthetic MVTec-layout generator: layout, determinism, exact masks, image modes, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stfpm_ray.data.synth import CATEGORY_KINDS, category_names, defect_types, generate_dataset, render_sample

SMALL = dict(size=32, n_train=3, n_test=6)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("synth")
    lines: list[str] = []
    names = generate_dataset(root, categories=len(CATEGORY_KINDS) + 1, progress=lines.append, **SMALL)
    return root, names, lines


def test_layout_matches_mvtec(dataset: tuple[Path, list[str], list[str]]) -> None:
    root, names, _ = dataset
    assert sorted(p.name for p in root.iterdir()) == sorted(names)  # no staging folders left behind
    for name in names:
        category = root / name
        assert sorted(p.name for p in (category / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        test_folders = sorted(p.name for p in (category / "test").iterdir())
        assert test_folders == sorted(("good",) + defect_types(name))
        assert sorted(p.name for p in (category / "ground_truth").iterdir()) == sorted(defect_types(name))
        assert len(list((category / "test").rglob("*.png"))) == SMALL["n_test"]
        assert len(list((category / "test" / "good").iterdir())) >= 1
        for defect in defect_types(name):
            images = sorted((category / "test" / defect).iterdir())
            masks = sorted((category / "ground_truth" / defect).iterdir())
            assert images and [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
            for image_path, mask_path in zip(images, masks):
                mask = Image.open(mask_path)
                assert mask.mode == "L" and mask.size == Image.open(image_path).size == (SMALL["size"],) * 2
                values = np.asarray(mask)
                assert set(np.unique(values)) == {0, 255}


def test_progress_reports_each_category(dataset: tuple[Path, list[str], list[str]]) -> None:
    _, names, lines = dataset
    assert len(lines) == len(names) and all(line.startswith(f"{name}:") for name, line in zip(names, lines))


def test_grayscale_and_rgb_modes(dataset: tuple[Path, list[str], list[str]]) -> None:
    root, names, _ = dataset
    modes = {name: Image.open(root / name / "train" / "good" / "000.png").mode for name in names}
    assert {"L", "RGB"} <= set(modes.values())
    for name, mode in modes.items():
        image, _, _ = render_sample(name, 32, np.random.default_rng(0))
        assert mode == ("L" if image.ndim == 2 else "RGB")
        assert Image.open(root / name / "test" / "good" / "000.png").mode == mode
    assert modes[f"{CATEGORY_KINDS[0]}_2"] == modes[CATEGORY_KINDS[0]]  # a variant keeps its kind's mode


def test_same_arguments_give_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    first = generate_dataset(tmp_path / "a", categories=2, **SMALL)
    generate_dataset(tmp_path / "b", categories=2, **SMALL)
    generate_dataset(tmp_path / "c", categories=2, seed=1, **SMALL)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    train = [key for key in a if "/train/" in key]
    assert all(a[key] != c[key] for key in train)
    # A category's images do not depend on how many categories were requested.
    generate_dataset(tmp_path / "d", categories=1, **SMALL)
    assert _files(tmp_path / "d" / first[0]) == _files(tmp_path / "a" / first[0])


@pytest.mark.parametrize("category", list(CATEGORY_KINDS) + [f"{CATEGORY_KINDS[3]}_2"])
def test_masks_are_exact(category: str) -> None:
    size = 64
    for seed in range(4):
        image, clean, mask = render_sample(category, size, np.random.default_rng(seed), None)
        assert not mask.any() and np.array_equal(image, clean)
        for defect in defect_types(category):
            image, clean, mask = render_sample(category, size, np.random.default_rng(seed), defect)
            assert image.dtype == np.uint8 and image.shape[:2] == mask.shape == (size, size)
            assert np.array_equal(image[~mask], clean[~mask])
            assert 0.0005 < mask.mean() < 0.05, (defect, mask.mean())
            change = np.abs(image.astype(int) - clean.astype(int))
            change = change.max(axis=-1) if change.ndim == 3 else change
            assert (change[mask] >= 8).mean() > 0.6, defect


def test_variants_look_different_from_their_kind() -> None:
    base, _, _ = render_sample(CATEGORY_KINDS[0], 64, np.random.default_rng(0))
    variant, _, _ = render_sample(f"{CATEGORY_KINDS[0]}_2", 64, np.random.default_rng(0))
    assert np.abs(base.astype(int) - variant.astype(int)).mean() > 20


def test_names_are_unique_and_stable() -> None:
    assert len(CATEGORY_KINDS) >= 6
    names = category_names(15)
    assert len(set(names)) == 15 and names[: len(CATEGORY_KINDS)] == list(CATEGORY_KINDS)
    assert category_names(3) == names[:3]
    assert len(set(category_names(40))) == 40
    assert all(len(defect_types(name)) >= 3 for name in names)


def test_fifteen_categories_are_written(tmp_path: Path) -> None:
    names = generate_dataset(tmp_path, categories=15, size=32, n_train=1, n_test=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names) and len(names) == 15
    for name in names:
        assert len(list((tmp_path / name / "test").rglob("*.png"))) == 2
        assert len(list((tmp_path / name / "test" / "good").iterdir())) == 1


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(size=31), "size"),
        (dict(categories=0), "categories"),
        (dict(n_train=0), "n_train"),
        (dict(n_test=1), "n_test"),
        (dict(seed=-1), "seed"),
        (dict(size=64.0), "size"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_category_folder(tmp_path: Path) -> None:
    (tmp_path / CATEGORY_KINDS[1]).mkdir()
    (tmp_path / CATEGORY_KINDS[1] / "keep.txt").write_text("x")
    (tmp_path / CATEGORY_KINDS[0]).mkdir()  # empty: fine to fill
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        generate_dataset(tmp_path, categories=2, **SMALL)
    assert not any((tmp_path / CATEGORY_KINDS[0]).iterdir())  # nothing written before the refusal
    assert generate_dataset(tmp_path, categories=1, **SMALL) == [CATEGORY_KINDS[0]]


def test_unknown_category_or_defect_is_a_clear_error() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown synthetic category"):
        render_sample("carpet", 32, rng)
    with pytest.raises(ValueError, match="unknown synthetic category"):
        render_sample(f"{CATEGORY_KINDS[0]}_1", 32, rng)
    with pytest.raises(ValueError, match="has no defect"):
        render_sample(CATEGORY_KINDS[0], 32, rng, "no-such-defect")
