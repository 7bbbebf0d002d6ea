"""Decoding and resizing of user images, robust to what real archives contain.

Every decode path (training, scoring, evaluation masks) goes through here so that a model sees the same
pixels at training and at scoring time. Bad files raise :class:`ImageDecodeError` with a message fit for an
error row; nothing else escapes.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Larger images are refused before decoding: a 100 MP image is ~300 MB of RGB and no inspection camera
# needs more; the check also stops decompression bombs (tiny files that claim huge dimensions).
MAX_IMAGE_PIXELS = 100_000_000


class ImageDecodeError(ValueError):
    """A file that cannot be turned into an image; the message is meant for an error row."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; 16/32-bit grey is rescaled, not clipped, so detail survives."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes to a ``size`` x ``size`` x 3 uint8 array.

    EXIF orientation is applied (phone and some line-scan cameras store it), alpha is dropped, grey,
    palette, CMYK and 16-bit images become RGB. JPEGs are decoded at a reduced scale when that is still
    larger than ``size`` (Pillow's draft mode), which is several times faster for large photos.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(
                    f"image of {width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels"
                )
            if image.format == "JPEG":
                image.draft("RGB", (size, size))
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"refused as a decompression bomb: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Read and decode one image file; see :func:`decode_image`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode_image(data, size)


def load_mask(path: str | Path | None, size: int) -> np.ndarray:
    """A ground-truth mask as ``size`` x ``size`` bool (>0 is anomalous); ``None`` means all normal.

    Resized with a box filter then thresholded at half coverage, so thin defects keep their area instead
    of vanishing as they can under nearest-neighbour sampling.
    """
    if path is None:
        return np.zeros((size, size), dtype=bool)
    with Image.open(path) as mask:
        binary = Image.fromarray((np.asarray(mask.convert("L")) > 0).astype(np.uint8) * 255)
    return np.asarray(binary.resize((size, size), Image.Resampling.BOX)) >= 128
