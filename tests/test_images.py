"""Decoding real-world files: every odd format is handled or refused with a message."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import png_rgb16
from PIL import Image

from stfpm_ray.data.images import MAX_IMAGE_PIXELS, ImageDecodeError, decode_image, load_image, load_mask
from stfpm_ray.store.mapcodec import decode_map, encode_map


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


GRADIENT = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
NOISE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(GRADIENT),  # grayscale
        Image.fromarray(np.dstack([GRADIENT] * 3 + [np.full_like(GRADIENT, 128)])),  # RGBA
        Image.fromarray(np.dstack([GRADIENT] * 3)).convert("P"),  # palette
    ],
    ids=["gray", "rgba", "palette"],
)
def test_modes_become_rgb(image):
    out = decode_image(_encode(image), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # left-to-right gradient survives in every channel
    assert out[:, -1].mean() > out[:, 0].mean() + 150


def test_sixteen_bit_is_rescaled_not_clipped():
    wide = (GRADIENT.astype(np.uint16) * 257).astype(np.uint16)
    out = decode_image(_encode(Image.fromarray(wide)), 64)
    # clipping would make almost everything 255; rescaling keeps the gradient
    assert abs(int(out[0, 0, 0]) - int(GRADIENT[0, 0])) <= 2
    assert abs(int(out[0, 32, 0]) - int(GRADIENT[0, 32])) <= 2


def test_cmyk_jpeg():
    rgb = Image.fromarray(np.dstack([GRADIENT] * 3))
    out = decode_image(_encode(rgb.convert("CMYK"), "JPEG", quality=95), 64)
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int)[..., 0] - GRADIENT).mean() < 8


@pytest.mark.parametrize(("fmt", "options"), [("JPEG", {"quality": 95}), ("PNG", {})])
def test_exif_rotation_applied(fmt, options):
    # a wide image whose EXIF says "rotate 90": decoded content must be the rotated one
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :32] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    data = _encode(Image.fromarray(array), fmt, exif=exif, **options)
    out = decode_image(data, 32)
    # after rotation the white half is on top
    assert out[:16].mean() > 200 and out[16:].mean() < 55


def test_sixteen_bit_rgb_png_decodes_like_pillow():
    array = np.random.default_rng(2).integers(0, 65536, (40, 50, 3)).astype(np.uint16)
    data = png_rgb16(array)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(decode_image(data, 32), expected)


@pytest.mark.parametrize("options", [{"transparency": (1, 2, 3)}, {"interlace": 1}], ids=["tRNS", "interlaced"])
def test_rgb_png_variants_decode_like_pillow(options):
    data = _encode(Image.fromarray(NOISE), **options)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(decode_image(data, 32), expected)


def test_rgb_png_fast_path_gives_pillows_pixels():
    # 8-bit RGB PNGs go through libpng; the pixels must be exactly those of Pillow's own decoder
    array = np.random.default_rng(1).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(array).resize((48, 48), Image.Resampling.BILINEAR))
    assert np.array_equal(decode_image(_encode(Image.fromarray(array)), 48), expected)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a readable image"),
        (_encode(Image.fromarray(NOISE))[: len(_encode(Image.fromarray(NOISE))) // 2], "corrupt or truncated"),
    ],
    ids=["zero-byte", "text", "truncated"],
)
def test_bad_files_raise_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, 32)


def test_decompression_bomb_refused_before_decoding():
    # a valid PNG header claiming 20000 x 20000 pixels, with (almost) no data behind it
    side = int(MAX_IMAGE_PIXELS**0.5) + 1000
    header = _encode(Image.new("L", (1, 1)))
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    bomb = header[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + header[33:]
    with pytest.raises(ImageDecodeError, match="exceeds the limit|bomb"):
        decode_image(bomb, 32)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_image(tmp_path / "nope.png", 32)


def test_mask_keeps_thin_defects(tmp_path):
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[100:104, :] = 255  # a 4-pixel line: 1/64 of the height
    Image.fromarray(mask).save(tmp_path / "m.png")
    small = load_mask(tmp_path / "m.png", 64)
    assert small.dtype == bool and small.shape == (64, 64)
    assert small[25].all() and small.sum() == 64
    assert not load_mask(None, 16).any()


def test_map_codec_round_trip():
    rng = np.random.default_rng(0)
    values = rng.gamma(0.5, 0.01, size=(128, 128)).astype(np.float32)
    data, scale = encode_map(values)
    decoded = decode_map(data, scale)
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    assert np.abs(decoded - values).max() <= values.max() / 65535
    assert len(data) < 40_000
    zero_data, zero_scale = encode_map(np.zeros((8, 8), dtype=np.float32))
    assert not decode_map(zero_data, zero_scale).any()
