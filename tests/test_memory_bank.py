"""The memory of good teacher features: its nearest-neighbour distance, its coreset, and the model around it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from stfpm_ray.core.checkpoint import (
    MEMORY_KEY,
    META_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    validate_checkpoint,
)
from stfpm_ray.core.fit import TrainConfig, fit_category
from stfpm_ray.core.memory_bank import (
    NEIGHBOURS,
    bank_channels,
    greedy_coreset,
    nearest_distances,
    patch_features,
)
from stfpm_ray.core.teacher import create_features
from stfpm_ray.data.mvtec import discover_categories
from stfpm_ray.errors import UserError


def test_nearest_distances_match_brute_force_across_bank_chunks():
    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(3, 8, 5, 4, generator=generator)
    bank = torch.randn(2500, 8, generator=generator)  # more rows than one chunk
    queries = patches.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.cdist(queries, bank).amin(dim=1).view(3, 5, 4)
    assert torch.allclose(nearest_distances(patches, bank), expected, atol=1e-4)
    # a position that is in the bank is at distance zero
    assert nearest_distances(bank[7].view(1, 8, 1, 1), bank).item() == pytest.approx(0.0, abs=1e-3)


def test_distances_average_the_nearest_rows_whichever_chunk_holds_them():
    generator = torch.Generator().manual_seed(1)
    patches = torch.randn(2, 8, 3, 3, generator=generator)
    bank = torch.randn(2100, 8, generator=generator)  # three chunks, the last one short
    queries = patches.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.cdist(queries, bank).topk(3, dim=1, largest=False).values.mean(dim=1).view(2, 3, 3)
    assert torch.allclose(nearest_distances(patches, bank, neighbours=3), expected, atol=1e-4)
    # a bank with fewer rows than neighbours averages all of them
    every_row = torch.cdist(queries, bank[:2]).mean(dim=1).view(2, 3, 3)
    assert torch.allclose(nearest_distances(patches, bank[:2], neighbours=3), every_row, atol=1e-4)


def test_the_coreset_keeps_a_rare_pattern_that_a_random_subset_of_its_size_loses():
    generator = torch.Generator().manual_seed(0)
    common = [torch.randn(500, 16, generator=generator) * 0.01 + 5 * torch.eye(16)[i] for i in range(3)]
    rare = torch.full((1, 16), -4.0)
    features = torch.cat([*common, rare])
    chosen = greedy_coreset(features, 4, torch.Generator().manual_seed(1))
    assert len(set(chosen.tolist())) == 4
    assert len(features) - 1 in chosen.tolist()  # the one rare row
    assert {int(i) // 500 for i in chosen if i < 1500} == {0, 1, 2}  # one from each common cluster
    assert torch.equal(greedy_coreset(features, 10_000, generator), torch.arange(len(features)))


def test_patch_features_join_the_last_two_levels_at_the_finer_resolution():
    network = create_features("tf_efficientnet_lite0", (1, 2, 3)).eval()
    with torch.no_grad():
        levels = network(torch.randn(2, 3, 64, 96))
    patches = patch_features(levels)
    assert patches.shape == (2, levels[1].shape[1] + levels[2].shape[1], *levels[1].shape[-2:])
    assert patches.shape[1] == bank_channels("tf_efficientnet_lite0", (1, 2, 3))


@pytest.fixture(scope="module")
def banked(synth_root, tmp_path_factory):
    category = discover_categories(synth_root)[0]
    config = TrainConfig(image_size=64, epochs=1, batch_size=8, weights="offline", memory_bank=100)
    result = fit_category(synth_root, category, config)
    folder = tmp_path_factory.mktemp("banked") / category
    meta = save_checkpoint(folder, result.model.student, result.meta, result.model.memory_bank)
    return result, folder, meta


def test_training_keeps_a_bank_and_scales_both_maps_on_held_out_good_images(banked):
    result, _, meta = banked
    model = result.model
    assert meta.memory_bank == 100 and model.memory_bank.shape == (100, bank_channels(meta.backbone, meta.layers))
    val = result.fitter.val_images
    assert meta.memory_neighbours == model.memory_neighbours == NEIGHBOURS
    student, memory = model.opinion_maps(val)
    # each map divided by its own mean maximum on these very images: both average 1 there
    scales = meta.map_scales
    assert float(student.flatten(1).amax(1).mean()) == pytest.approx(scales[0], rel=1e-4)
    assert float(memory.flatten(1).amax(1).mean()) == pytest.approx(scales[1], rel=1e-4)
    maps, scores = model.predict(val)
    assert torch.allclose(maps, (student / scales[0] + memory / scales[1]) / 2, atol=1e-6)
    assert meta.calibration["val_max"] == pytest.approx(float(scores.max()))


def test_a_saved_bank_scores_the_same_after_loading(banked):
    result, folder, meta = banked
    assert validate_checkpoint(folder) == meta
    model, loaded = load_checkpoint(folder)
    assert loaded.map_scales == meta.map_scales and torch.equal(model.memory_bank, result.model.memory_bank)
    assert model.memory_neighbours == NEIGHBOURS
    images = result.fitter.val_images
    assert torch.allclose(model.predict(images)[1], result.model.predict(images)[1], rtol=1e-5)
    # and the bank is part of the model's identity: a model without one is another model
    plain = replace(meta, memory_bank=0, memory_neighbours=1, map_scales=None)
    assert save_checkpoint(folder.parent / "without", result.model.student, plain).model_id != meta.model_id


def test_a_memory_written_before_neighbours_existed_scores_with_the_nearest_alone(banked, tmp_path):
    result, folder, _ = banked
    raw = json.loads((folder / META_FILE).read_text())
    assert raw["memory_neighbours"] == NEIGHBOURS
    del raw["memory_neighbours"]
    older = tmp_path / "older"
    older.mkdir()
    (older / META_FILE).write_text(json.dumps(raw))
    (older / "student.safetensors").write_bytes((folder / "student.safetensors").read_bytes())
    model, meta = load_checkpoint(older)
    assert meta.memory_neighbours == model.memory_neighbours == 1
    images = result.fitter.val_images[:2]
    trained = result.model
    trained.memory_neighbours = 1
    try:
        expected = trained.opinion_maps(images)[1]
    finally:
        trained.memory_neighbours = NEIGHBOURS
    assert torch.allclose(model.opinion_maps(images)[1], expected, atol=1e-5)
    assert not torch.allclose(trained.opinion_maps(images)[1], expected, atol=1e-5)


def test_a_checkpoint_whose_bank_does_not_match_its_metadata_is_refused(banked, tmp_path):
    result, folder, meta = banked
    with pytest.raises(ValueError, match="promises a memory bank of 100 rows, given 0"):
        save_checkpoint(tmp_path / "missing", result.model.student, meta)
    raw = json.loads((folder / META_FILE).read_text())
    raw["memory_bank"] = 99
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / META_FILE).write_text(json.dumps(raw))
    (broken / "student.safetensors").write_bytes((folder / "student.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=MEMORY_KEY):
        validate_checkpoint(broken)
    (broken / META_FILE).write_text(json.dumps({**raw, "memory_bank": 100, "memory_neighbours": 101}))
    with pytest.raises(CheckpointError, match="memory_neighbours"):
        validate_checkpoint(broken)
    del raw["map_scales"]
    (broken / META_FILE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="map_scales"):
        validate_checkpoint(broken)


def test_the_mirror_student_keeps_no_bank_by_default_and_sizes_are_checked():
    assert TrainConfig(student="mirror").memory_bank == 0 and TrainConfig().memory_bank == 3000
    with pytest.raises(UserError, match="memory bank size"):
        TrainConfig(memory_bank=-1)
