"""The one preprocessing path: every format, asserted on pixel values."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kidney_edge.errors import ImageReadError
from kidney_edge.imaging import (
    is_image_file,
    load_image,
    preprocess,
    preprocess_batch,
    resized_image,
)
from kidney_edge.spec import ModelSpec

SPEC64 = ModelSpec(input_size=64, resize="stretch")


def ramp(size: int = 64) -> np.ndarray:
    """(size, size) uint8 with distinct, asymmetric values (so rotations are detectable)."""
    y, x = np.mgrid[0:size, 0:size]
    return ((x * 3 + y * 1) % 256).astype(np.uint8)


def pixels_of(array: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Undo the normalisation: model input -> 0..255 pixel values."""
    mean = np.asarray(spec.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(3, 1, 1)
    return array * std + mean


def write_png_raw(path: Path, width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> None:
    """A minimal PNG writer (Pillow cannot write 16-bit RGB, nor lie about dimensions)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_uniform_gray_jpeg_maps_to_known_input_value(tmp_path: Path) -> None:
    path = tmp_path / "gray.jpg"
    Image.new("RGB", (512, 512), (100, 100, 100)).save(path, quality=95)
    x = preprocess(path, ModelSpec())
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x, (100 - 127) / 128, atol=1 / 128)


def test_16bit_png_preprocesses_like_its_8bit_twin(tmp_path: Path) -> None:
    gray = ramp()
    Image.fromarray(gray).save(tmp_path / "g8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    np.testing.assert_array_equal(
        preprocess(tmp_path / "g8.png", SPEC64), preprocess(tmp_path / "g16.png", SPEC64)
    )
    np.testing.assert_allclose(pixels_of(preprocess(tmp_path / "g8.png", SPEC64), SPEC64)[0], gray, atol=1e-4)


def test_16bit_rgb_png_matches_8bit_rgb(tmp_path: Path) -> None:
    rgb = np.stack([ramp(), ramp()[::-1], ramp().T], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb8.png")
    rows16 = b"".join(b"\x00" + (rgb[r].astype(">u2") * 257).tobytes() for r in range(64))
    write_png_raw(tmp_path / "rgb16.png", 64, 64, 16, 2, rows16)
    spec = SPEC64.replace(color_mode="rgb")
    np.testing.assert_array_equal(
        preprocess(tmp_path / "rgb8.png", spec), preprocess(tmp_path / "rgb16.png", spec)
    )
    np.testing.assert_allclose(
        pixels_of(preprocess(tmp_path / "rgb8.png", spec), spec).transpose(1, 2, 0), rgb
    )


def test_lossless_formats_agree(tmp_path: Path) -> None:
    gray = ramp()
    image = Image.fromarray(gray)
    for name in ("a.png", "a.bmp", "a.tif", "a.tiff"):
        image.save(tmp_path / name)
    image.convert("RGB").save(tmp_path / "rgb.png")
    image.convert("P").save(tmp_path / "palette.png")
    reference = preprocess(tmp_path / "a.png", SPEC64)
    for name in ("a.bmp", "a.tif", "a.tiff", "rgb.png", "palette.png"):
        np.testing.assert_array_equal(preprocess(tmp_path / name, SPEC64), reference, err_msg=name)


def test_gray_is_replicated_and_rgb_kept(tmp_path: Path) -> None:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "red.png")
    gray_input = pixels_of(preprocess(tmp_path / "red.png", SPEC64), SPEC64)
    assert np.allclose(gray_input[0], gray_input[1]) and np.allclose(gray_input[1], gray_input[2])
    np.testing.assert_allclose(gray_input[0], round(200 * 0.299), atol=1)
    spec_rgb = SPEC64.replace(color_mode="rgb")
    rgb_input = pixels_of(preprocess(tmp_path / "red.png", spec_rgb), spec_rgb)
    np.testing.assert_allclose(rgb_input[:, 0, 0], [200, 0, 0], atol=1e-4)
    bgr = SPEC64.replace(color_mode="rgb", channel_order="BGR")
    np.testing.assert_allclose(
        pixels_of(preprocess(tmp_path / "red.png", bgr), bgr)[:, 0, 0], [0, 0, 200], atol=1e-4
    )


def test_rgba_is_composited_over_black(tmp_path: Path) -> None:
    rgba = np.full((64, 64, 4), 255, np.uint8)
    rgba[:32, :, 3] = 0  # top half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    values = pixels_of(preprocess(tmp_path / "alpha.png", SPEC64), SPEC64)[0]
    np.testing.assert_allclose(values[:32], 0, atol=1e-4)
    np.testing.assert_allclose(values[32:], 255, atol=1e-4)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    gray = ramp()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(gray).save(tmp_path / "rotated.png", exif=exif.tobytes())
    shown = np.asarray(load_image(tmp_path / "rotated.png", SPEC64))
    np.testing.assert_array_equal(shown, np.rot90(gray, k=-1))


def test_resize_rules(tmp_path: Path) -> None:
    Image.new("L", (200, 100), 255).save(tmp_path / "wide.png")
    spec = ModelSpec(input_size=64)
    letterbox = np.asarray(resized_image(tmp_path / "wide.png", spec.replace(resize="letterbox")))
    assert letterbox.shape == (64, 64)
    assert letterbox[:14].max() == 0 and letterbox[-14:].max() == 0  # black bands top and bottom
    assert letterbox[20:44].min() == 255
    crop = np.asarray(resized_image(tmp_path / "wide.png", spec.replace(resize="center_crop")))
    assert crop.shape == (64, 64) and crop.min() == 255
    stretch = np.asarray(resized_image(tmp_path / "wide.png", spec.replace(resize="stretch")))
    assert stretch.shape == (64, 64) and stretch.min() == 255


def test_array_and_pil_sources_match_file(tmp_path: Path) -> None:
    gray = ramp()
    Image.fromarray(gray).save(tmp_path / "g.png")
    from_file = preprocess(tmp_path / "g.png", SPEC64)
    np.testing.assert_array_equal(preprocess(gray, SPEC64), from_file)
    np.testing.assert_array_equal(preprocess(Image.fromarray(gray), SPEC64), from_file)
    batch = preprocess_batch([tmp_path / "g.png"] * 2, SPEC64)
    assert batch.shape == (2, 3, 64, 64)
    np.testing.assert_array_equal(batch[1], from_file)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty"),
        ("text.jpg", b"this is not an image at all" * 10, "not an image"),
        ("notes.png", b"\x89PNG\r\n\x1a\n garbage", "corrupt or truncated"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        preprocess(path, SPEC64)
    assert str(path) in str(info.value)


def test_truncated_jpeg(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(ramp(256)).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="truncated") as info:
        preprocess(path, SPEC64)
    assert str(path) in str(info.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    for side in (100_000, 8_000):  # over Pillow's own limit; over ours (40 MP) but under Pillow's
        write_png_raw(path, side, side, 8, 0, b"\x00" * 10)
        with pytest.raises(ImageReadError, match="too large"):
            preprocess(path, SPEC64)


def test_missing_file() -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        preprocess("/nonexistent/slice.png", SPEC64)


def test_is_image_file(tmp_path: Path) -> None:
    (tmp_path / "a.JPG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    dicom_like = tmp_path / "IM0001"
    dicom_like.write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 10)
    assert is_image_file(tmp_path / "a.JPG") and is_image_file(dicom_like)
    assert not is_image_file(tmp_path / "notes.txt")


@pytest.mark.parametrize(
    "mode, order, mean, std",
    [("L", "RGB", (127.0,) * 3, (128.0,) * 3), ("L", "RGB", (120.5, 110.0, 100.25), (60.0, 61.5, 70.0)),
     ("RGB", "RGB", (120.5, 110.0, 100.25), (60.0, 61.5, 70.0)), ("RGB", "BGR", (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))],
)  # fmt: skip
def test_preprocess_into_a_batch_row_equals_the_array_formula_bit_for_bit(
    mode: str, order: str, mean: tuple, std: tuple
) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64) if mode == "L" else (64, 64, 3), dtype=np.uint8)
    spec = ModelSpec(input_size=64, resize="stretch", color_mode="gray" if mode == "L" else "rgb",
                     channel_order=order, mean=mean, std=std)  # fmt: skip
    chw = np.broadcast_to(pixels, (3, 64, 64)) if mode == "L" else pixels.transpose(2, 0, 1)
    chw = chw[::-1] if order == "BGR" else chw
    mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in (spec.mean, spec.std))
    expected = (chw.astype(np.float32) - mean) / std  # (3, S, S) float32
    batch = np.full((2, 3, 64, 64), np.nan, dtype=np.float32)
    returned = preprocess(pixels, spec, out=batch[1])
    assert returned is batch[1] or np.shares_memory(returned, batch)
    assert batch[1].tobytes() == expected.tobytes() and np.isnan(batch[0]).all()
    assert preprocess(pixels, spec).tobytes() == expected.tobytes()
