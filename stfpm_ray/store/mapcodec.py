"""Compact storage of anomaly maps in the scores table.

A float32 map at 256x256 is 256 KB; a nightly archive of a million images would carry 256 GB of maps.
Maps are therefore stored as a 16-bit grayscale PNG plus a float scale: ``map = png / 65535 * scale``.
PNG is readable with Pillow alone, lossless for the quantised values, and compresses the smooth maps
well; the quantisation step is ``scale / 65535`` (relative error < 1.6e-5 of the image's own maximum).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAP_LEVELS = 65535


def encode_map(anomaly_map: np.ndarray) -> tuple[bytes, float]:
    """Encode a non-negative HxW float map as (16-bit PNG bytes, scale)."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D, got shape {values.shape}")
    scale = float(values.max()) if values.size else 0.0
    if not np.isfinite(scale) or scale <= 0.0:
        quantised = np.zeros(values.shape, dtype=np.uint16)
        scale = max(scale, 0.0) if np.isfinite(scale) else 0.0
    else:
        quantised = np.clip(np.rint(values / scale * MAP_LEVELS), 0, MAP_LEVELS).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(quantised).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue(), scale


def decode_map(png_bytes: bytes, scale: float) -> np.ndarray:
    """Decode a map written by :func:`encode_map` back to float32."""
    quantised = np.asarray(Image.open(io.BytesIO(png_bytes)), dtype=np.float32)
    return quantised * np.float32(scale / MAP_LEVELS)
