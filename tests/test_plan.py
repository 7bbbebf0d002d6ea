"""Scoring plans (stfpm_ray.data.plan): routing without file-system calls for what is skipped, and decoding
that turns any failure into an error row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from conftest import models_of, plain_folder

from stfpm_ray.data import plan as plan_module
from stfpm_ray.data.listing import list_images
from stfpm_ray.data.plan import decode_block, plan


def test_an_unexpected_decoder_error_becomes_an_error_row(trained, synth_root, tmp_path, monkeypatch):
    images = plain_folder(tmp_path / "plain", synth_root, trained[1][0], 2)
    listing = list_images([str(tmp_path / "plain")])
    [block] = plan(listing, models_of(trained[0]), {}, trained[1][0], None, 8).blocks
    sources = listing.sources
    decode, broken = plan_module.decode_image, images[0].read_bytes()

    def decoder_with_a_bug(data: bytes, size: int) -> np.ndarray:
        if data == broken:
            raise TypeError("a decoder bug")
        return decode(data, size)

    monkeypatch.setattr(plan_module, "decode_image", decoder_with_a_bug)
    decoded = decode_block(block, sources)
    errors = {Path(p).name: e for p, e in zip(decoded["path"].to_pylist(), decoded["error"].to_pylist())}
    assert errors == {images[0].name: "unexpected error while decoding: TypeError: a decoder bug", images[1].name: None}


def test_planning_looks_up_masks_only_for_images_it_will_score(trained, synth_root, monkeypatch):
    """A night over an archive of labelled test images: already-scored paths cost no file-system call."""
    from stfpm_ray.data import mvtec

    category = trained[1][0]
    listing = list_images([str(synth_root)])
    defective = sorted(p for p in listing.files["path"].to_pylist() if f"/{category}/test/" in p and "/good/" not in p)
    fresh = defective[0]
    looked_up: list[str] = []
    monkeypatch.setattr(mvtec, "is_file", lambda path: looked_up.append(path) or True)

    def scored(keys):
        return pa.array([path != fresh for path in keys["path"].to_pylist()])

    planned = plan(listing, models_of(trained[0]), {}, None, scored, 64)
    counts = planned.counts
    [row] = [r for block in planned.blocks for r in block.to_pylist()]
    assert row["path"] == fresh and row["label"] == 1 and row["mask_path"] == looked_up[0]
    assert len(looked_up) == 1 and counts[category].skipped > len(defective) - 1
