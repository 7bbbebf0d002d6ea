"""Shared fixtures: one Ray instance per test session, small synthetic and real data."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

# Ray reads this once, at its first import (a test module may import Ray before any fixture runs): the
# session's local instance then binds loopback only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

SHARED_BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"
# CI sets STFPM_REQUIRE_ALL=1: a test whose data or privileges are missing then fails instead of skipping.
REQUIRE_ALL = os.environ.get("STFPM_REQUIRE_ALL") == "1"


def need(available: bool, reason: str) -> None:
    """Skip the calling test with ``reason`` when ``available`` is false (fail under STFPM_REQUIRE_ALL=1)."""
    if available:
        return
    if REQUIRE_ALL:
        pytest.fail(f"{reason} (STFPM_REQUIRE_ALL=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark by what a test uses: Ray makes it slow, the shared MVTec data makes it real_data (modules that
    start Ray or read ../shared in other ways carry their marks themselves)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "ray_session" in fixtures:
            item.add_marker(pytest.mark.slow)
        if "shared_bottle" in fixtures:
            item.add_marker(pytest.mark.real_data)


@pytest.fixture
def shared_bottle() -> Path:
    """The real MVTec AD bottle category, read in place from ../shared (never copied into the repository)."""
    need(SHARED_BOTTLE.is_dir(), f"needs the MVTec AD bottle category at {SHARED_BOTTLE}")
    return SHARED_BOTTLE


def handmade_png(width: int, height: int, bit_depth: int, scanlines: bytes) -> bytes:
    """An RGB PNG written chunk by chunk, for files Pillow cannot write (16-bit RGB, lying headers)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b"")
    )


def png_rgb16(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of an (H, W, 3) uint16 array; Pillow reads these as 8-bit RGB."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    return handmade_png(array.shape[1], array.shape[0], 16, rows)


@pytest.fixture(scope="session")
def ray_session():
    """A local two-CPU Ray instance on loopback, shared by every test that needs Ray."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Three small synthetic categories (64 px), generated once per session."""
    from stfpm_ray.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, categories=3, size=64, n_train=16, n_test=10, seed=0)
    return root


def quiet(message: str) -> None:
    """A progress function that drops every line."""


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synth_root) -> tuple[Path, list[str]]:
    """Checkpoints (2 epochs, 64 px) for the first two synthetic categories; the third is left without one on
    purpose."""
    from stfpm_ray.core.checkpoint import save_checkpoint
    from stfpm_ray.core.fit import TrainConfig, fit_category
    from stfpm_ray.core.teacher import load_teacher
    from stfpm_ray.data.mvtec import discover_categories

    folder = tmp_path_factory.mktemp("ckpt")
    categories = discover_categories(synth_root)
    config = TrainConfig(image_size=64, epochs=2, batch_size=8, weights="offline")
    teacher = load_teacher(config.backbone, config.layers, config.weights)
    for name in categories[:2]:
        model, meta, _ = fit_category(synth_root, name, config, teacher=teacher)
        save_checkpoint(folder / name, model.student, meta, model.memory_bank)
    return folder, categories


def models_of(checkpoints: Path) -> dict:
    """What planning needs of each usable checkpoint under ``checkpoints``: ``{category: meta}``."""
    from stfpm_ray.core.checkpoint import discover_checkpoints

    return {name: meta for name, (_, meta) in discover_checkpoints(checkpoints)[0].items()}


def plain_folder(target: Path, synth_root: Path, category: str, count: int, start: int = 0) -> list[Path]:
    """``count`` images of ``category`` under distinct names in one flat folder (a plain archive)."""
    target.mkdir(parents=True, exist_ok=True)
    folder = synth_root / category
    sources = sorted(folder.glob("test/*/*.png")) + sorted(folder.glob("train/good/*.png"))
    made = []
    for i in range(start, start + count):
        made.append(target / f"img_{i:03d}.png")
        shutil.copy(sources[i % len(sources)], made[-1])
    return made


def read_scores(table: Path | str):
    """The current version of a scores table as pandas (what readers see; never ``read_parquet(OUT_DIR)``)."""
    from deltalake import DeltaTable

    return DeltaTable(str(table)).to_pandas()
