"""Decoding and resizing of user images, robust to what real archives contain.

Every decode path (training, scoring, evaluation masks) goes through here so that a model sees the same
pixels at training and at scoring time. Bad files raise :class:`ImageDecodeError` with a message fit for an
error row; nothing else escapes.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from stfpm_ray.errors import StfpmError
from stfpm_ray.store.fs import open_input, read_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Larger images are refused before decoding: a 100 MP image is ~300 MB of RGB and no inspection camera
# needs more; the check also stops decompression bombs (tiny files that claim huge dimensions).
MAX_IMAGE_PIXELS = 100_000_000


# A model's input size: (height, width), or one side for a square
Size = int | tuple[int, int]
# EXIF orientations that turn the stored image by 90 degrees (exif_transpose swaps its width and height)
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_HEADER_READ = 1 << 16


class ImageDecodeError(StfpmError, ValueError):
    """A file that cannot be turned into an image; the message is meant for an error row."""


def height_width(size: Size) -> tuple[int, int]:
    """``size`` as (height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _is_turned(image: Image.Image) -> bool:
    """Whether the image's EXIF orientation turns it by 90 degrees (its shown width and height are swapped).

    A PNG without an eXIf chunk before its pixels is taken as upright: asking Pillow would decode the whole
    image to look for one after them.
    """
    if image.format == "PNG" and "exif" not in image.info:
        return False
    return image.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSING_ORIENTATIONS


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; 16/32-bit grey is rescaled, not clipped, so detail survives."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def _is_plain_rgb_png(image: Image.Image, data: bytes) -> bool:
    """An 8-bit RGB PNG without an EXIF chunk, which libpng decodes to exactly Pillow's pixels.

    Bit depth and colour type are read from the IHDR chunk, which the PNG format fixes at bytes 24 and 25
    (Pillow reports 16-bit RGB as mode RGB too). The EXIF test is a byte search (asking Pillow would
    decode the image); a false hit only costs speed.
    """
    return image.format == "PNG" and data[24:26] == b"\x08\x02" and b"eXIf" not in data


@functools.cache
def _libpng() -> Callable[..., Any] | None:
    """torchvision's libpng decoder, faster than Pillow's on megapixel PNGs (docs/results-history.md: speed; decoding is
    the smaller half of CPU scoring); None where torchvision no longer ships it (its image I/O is
    deprecated in favour of TorchCodec), and Pillow decodes everything."""
    try:
        from torchvision.io import decode_png
    except ImportError:
        return None
    return decode_png


def _decode_png(data: bytes, decode_png: Callable[..., Any]) -> Image.Image:
    from torchvision.io import ImageReadMode  # present wherever _libpng found decode_png

    try:
        pixels = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        reason = re.sub(r"^.*\.cpp:\d+, ", "", str(exc).strip().splitlines()[-1])  # drop the C++ location
        raise ImageDecodeError(f"corrupt or truncated image: {reason[:200]}") from None
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def decode_image(data: bytes, size: Size) -> np.ndarray:
    """Decode encoded image bytes to a height x width x 3 uint8 array of ``size`` (:func:`height_width`).

    EXIF orientation is applied (phone and some line-scan cameras store it), alpha is dropped, grey,
    palette, CMYK and 16-bit images become RGB. JPEGs are decoded at a reduced scale when that is still
    larger than ``size`` (Pillow's draft mode), which is several times faster for large photos.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    height, width = height_width(size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(
                    f"image of {image.width}x{image.height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels"
                )
            if image.format == "JPEG":  # reduced against the stored axes, which EXIF may turn by 90 degrees
                image.draft("RGB", (height, width) if _is_turned(image) else (width, height))
            if _is_plain_rgb_png(image, data) and (libpng := _libpng()) is not None:
                image = _decode_png(data, libpng)
            else:
                image = _to_rgb(ImageOps.exif_transpose(image))
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"refused as a decompression bomb: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None


def load_image(path: str | Path, size: Size) -> np.ndarray:
    """Read and decode one image file; see :func:`decode_image`."""
    try:
        data = read_bytes(path)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode_image(data, size)


def image_aspect(path: str | Path) -> float | None:
    """Height over width of an image file as it will be decoded (EXIF rotation applied), from its header alone
    (read in 64 KiB pieces: one request each on object stores); None for a file that cannot be read (decoding
    reports it)."""
    try:
        with open_input(path) as handle, Image.open(io.BufferedReader(handle, _HEADER_READ)) as image:
            width, height = image.size
            if _is_turned(image):
                width, height = height, width
    except (OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError, Image.DecompressionBombError):
        return None
    return height / width if width and height else None


def load_mask(path: str | Path | None, size: Size) -> np.ndarray:
    """A ground-truth mask as a (height, width) bool array of ``size`` (>0 is anomalous); ``None`` means all
    normal.

    Resized with a box filter then thresholded at half coverage, so thin defects keep their area instead
    of vanishing as they can under nearest-neighbour sampling.
    """
    height, width = height_width(size)
    if path is None:
        return np.zeros((height, width), dtype=bool)
    with Image.open(io.BytesIO(read_bytes(path))) as mask:
        binary = Image.fromarray((np.asarray(mask.convert("L")) > 0).astype(np.uint8) * 255)
    return np.asarray(binary.resize((width, height), Image.Resampling.BOX)) >= 128
