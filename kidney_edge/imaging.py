"""Image I/O and THE preprocessing function: a file becomes the model's input array.

Training, evaluation, export parity, predict and benchmark all call :func:`preprocess`; there is
no second copy (train/serve skew is the usual reason an exported classifier disagrees with its
PyTorch original). numpy + Pillow only; pydicom is imported lazily for DICOM files.

Steps, all driven by the :class:`~kidney_edge.spec.ModelSpec`:
decode (JPEG draft mode; DICOM: Hounsfield units then the spec's CT window) -> EXIF orientation
-> 8-bit gray or RGB -> resize rule to ``input_size`` -> channels -> (pixel - mean) / std.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kidney_edge.errors import ImageReadError, InputError
from kidney_edge.regions import Box, region_box
from kidney_edge.spec import ColorMode, ModelSpec, RegionRule, ResizeRule

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"})
# A CT slice is at most a few megapixels; anything above this is refused before decoding,
# well below Pillow's own bomb limit, so a hostile header cannot trigger a huge allocation.
MAX_IMAGE_PIXELS = 40_000_000
_DICOM_MAGIC_OFFSET, _DICOM_MAGIC = 128, b"DICM"

# A file's content in memory (an upload): decoded like a file on disk, never written to one.
BinarySource = bytes | bytearray | memoryview | BinaryIO
FileSource = str | Path | BinarySource
ImageSource = FileSource | Image.Image | np.ndarray


def is_dicom_file(path: str | Path) -> bool:
    """A ``.dcm`` suffix, or the DICM magic at byte 128 (DICOM files often have no suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            return handle.read(4) == _DICOM_MAGIC
    except OSError:
        return False


def is_image_file(path: str | Path) -> bool:
    """Whether a scan should treat ``path`` as an image (by suffix, or by DICOM magic)."""
    path = Path(path)
    if path.suffix.lower() in SUPPORTED_SUFFIXES:
        return True
    # DICOM files often have no suffix, or a UID-style name whose last dotted part looks like one
    # (1.2.840.113619.2.55.3): the magic decides.
    return path.is_file() and is_dicom_file(path)


def load_image(source: FileSource, spec: ModelSpec) -> Image.Image:
    """Decode a file into an 8-bit ``L`` or ``RGB`` image as the spec's colour mode says.

    ``source`` is a path, or a file's bytes / a seekable binary file object (named in errors by
    its ``name`` attribute, else ``<upload>``); both take the same decoders. JPEGs are decoded
    in draft mode at the smallest DCT scale that still covers ``input_size`` (the same path in
    training and inference). Raises ImageReadError.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageReadError(path, "no such file")
        if path.stat().st_size == 0:
            raise ImageReadError(path, "file is empty (0 bytes)")
        name, readable, dicom = path, path, is_dicom_file(path)
    else:
        readable = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        name = getattr(readable, "name", None) or "<upload>"
        dicom = _stream_is_dicom(readable, name)
    image = _load_dicom(readable, spec, name) if dicom else _load_raster(readable, spec, name)
    return _to_color_mode(image, spec.color_mode)


def _stream_is_dicom(stream: BinaryIO, name: object) -> bool:
    """The DICM magic at byte 128 of an in-memory file; empty files raise. Leaves it at 0."""
    stream.seek(0)
    head = stream.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    stream.seek(0)
    if not head:
        raise ImageReadError(name, "file is empty (0 bytes)")
    return head[_DICOM_MAGIC_OFFSET:] == _DICOM_MAGIC


def _load_raster(source: Path | BinaryIO, spec: ModelSpec, name: object) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:  # reads the header only
                _check_pixel_count(name, image.size)
                if image.format == "JPEG":
                    draft_mode = "L" if spec.color_mode is ColorMode.GRAY else "RGB"
                    image.draft(draft_mode, (spec.input_size, spec.input_size))
                image.load()
                return _to_8bit(ImageOps.exif_transpose(image))
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"image too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise ImageReadError(name, "not an image Pillow can read (unknown format or not an image)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(name, f"corrupt or truncated image ({exc})") from None


def _check_pixel_count(path: object, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageReadError(
            path,
            f"image too large: it declares {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} pixel limit "
            "(a decompression bomb or not a CT slice)",
        )


def _to_8bit(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit ``L`` or ``RGB``. Transparency is composited over black (air)."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples: v16 = v8 * 257 maps back to exactly v8, so a 16-bit export of an
        # 8-bit image preprocesses to the same array.
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(values) <= 1.0 else 1.0  # floats in [0, 1] or already 0..255
        values = np.nan_to_num(values * scale)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "PA") or "A" in mode or mode.endswith("a"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _to_color_mode(image: Image.Image, color_mode: ColorMode) -> Image.Image:
    image = _to_8bit(image)
    wanted = "L" if color_mode is ColorMode.GRAY else "RGB"
    # Pillow's L = (19595 R + 38470 G + 7471 B + 2^15) >> 16: exact for CT's equal channels.
    return image if image.mode == wanted else image.convert(wanted)


def _import_pydicom(path: object) -> Any:
    try:
        import pydicom
    except ImportError:
        raise ImageReadError(path, "reading DICOM needs pydicom: pip install 'kidney-edge[dicom]'") from None
    return pydicom


def read_dicom(source: str | Path | BinaryIO, name: object = None) -> tuple[Any, np.ndarray]:
    """Read a DICOM file: (dataset, one frame of modality-LUT values, Hounsfield units for CT).

    ``source`` is a path or a binary file object (then it needs the DICM preamble; ``name``
    names it in errors). Multi-frame files give their middle frame (a CT volume's central slice).
    """
    if isinstance(source, (str, Path)):
        source = path = Path(source)
        force = path.suffix.lower() == ".dcm"
    else:
        path, force = name or getattr(source, "name", None) or "<upload>", False
    pydicom = _import_pydicom(path)
    from pydicom.pixels import apply_modality_lut

    try:
        with warnings.catch_warnings():  # malformed files: our error says it once, clearly
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(source, force=force)
    except Exception as exc:  # pydicom raises many types for malformed files
        raise ImageReadError(path, f"not a readable DICOM file ({exc})") from None
    if "PixelData" not in dataset:
        raise ImageReadError(path, "DICOM file has no pixel data (not an image object)")
    rows, cols = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    _check_pixel_count(path, (cols, rows))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = dataset.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as exc:
        syntax = dataset.file_meta.get("TransferSyntaxUID")
        name = getattr(syntax, "name", syntax)
        raise ImageReadError(
            path,
            f"cannot decode DICOM transfer syntax {name!s} ({syntax!s}): no decoder installed "
            f"({exc}). Install one, e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, "
            "or python-gdcm",
        ) from None
    except (ValueError, EOFError, AttributeError) as exc:
        raise ImageReadError(path, f"DICOM pixel data is truncated or corrupt ({exc})") from None
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        log.info("%s: %d frames, using the middle frame %d", path, frames, frames // 2)
        pixels = pixels[frames // 2]
    if pixels.ndim != 2:
        raise ImageReadError(
            path, f"DICOM pixel data has shape {pixels.shape}; only grayscale slices are supported"
        )
    return dataset, np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)


def dicom_window(dataset: Any, values: np.ndarray, spec: ModelSpec) -> tuple[float, float]:
    """(low, high) display window: the spec's CT window for CT, else the file's own or min/max."""
    if str(dataset.get("Modality", "")).upper() == "CT":
        window = spec.ct_window
        return window.level - window.width / 2, window.level + window.width / 2
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, Sequence) else center)
        width = float(width[0] if isinstance(width, Sequence) else width)
        return center - width / 2, center + width / 2
    return float(values.min()), float(values.max())


def _load_dicom(source: Path | BinaryIO, spec: ModelSpec, name: object) -> Image.Image:
    dataset, values = read_dicom(source, name)
    low, high = dicom_window(dataset, values, spec)
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0
    pixels = np.rint(scaled).astype(np.uint8)
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        pixels = 255 - pixels  # MONOCHROME1: the lowest value is displayed white
    return Image.fromarray(pixels, "L")


def resized_image(source: ImageSource, spec: ModelSpec) -> Image.Image:
    """Decode if needed and apply the spec's region and resize rules: an ``input_size`` square image."""
    return to_view(_as_image(source, spec), spec)[0]


@dataclass(frozen=True)
class ViewGeometry:
    """Where the model's (S, S) view lies on the decoded slice: the region rule kept ``box`` of
    the slice, and the resize rule drew that box onto ``placed`` of the view (letterbox: inside
    it; center crop: beyond it). Maps what the model saw, e.g. an activation map, back onto the slice."""

    slice_size: tuple[int, int]  # (width, height) of the decoded slice
    box: Box  # (left, top, right, bottom) on the slice
    placed: Box  # the same box in view pixels


def to_view(image: Image.Image, spec: ModelSpec) -> tuple[Image.Image, ViewGeometry]:
    """A decoded slice -> (the ``input_size`` square the model sees, where it lies on the slice)."""
    box = region_box(image, spec.region) or (0, 0, image.width, image.height)
    cropped = image if box == (0, 0, image.width, image.height) else image.crop(box)
    size = spec.input_size
    placed = placement(cropped.size, size, spec.resize)
    geometry = ViewGeometry(image.size, box, placed)
    if cropped.size == (size, size):
        return cropped, geometry
    left, top, right, bottom = placed
    resized = cropped.resize((right - left, bottom - top), Image.Resampling.BILINEAR)
    if spec.resize is ResizeRule.LETTERBOX:
        canvas = Image.new(cropped.mode, (size, size), 0)  # black = air in CT
        canvas.paste(resized, (left, top))
        return canvas, geometry
    return resized.crop((-left, -top, size - left, size - top)), geometry  # center crop: the middle


def placement(source: tuple[int, int], size: int, rule: ResizeRule) -> Box:
    """Where the resize rule draws a (width, height) image on the (size, size) view."""
    width, height = source
    if (width, height) == (size, size) or rule is ResizeRule.STRETCH:
        return (0, 0, size, size)
    if rule is ResizeRule.LETTERBOX:
        scale = size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        left, top = (size - new_w) // 2, (size - new_h) // 2
    else:  # CENTER_CROP: the short side fills the view, the long one is cut
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = -((new_w - size) // 2), -((new_h - size) // 2)
    return (left, top, left + new_w, top + new_h)


def heat_on_slice(heat: np.ndarray, geometry: ViewGeometry) -> np.ndarray:
    """A (S, S) map over the model's view -> (height, width) float32 over the decoded slice: the
    view's part of it drawn back onto the region's box, zero elsewhere (the model saw nothing there)."""
    size = heat.shape[0]
    left, top, right, bottom = geometry.placed
    on_box = np.zeros((bottom - top, right - left), dtype=np.float32)  # the box at view scale
    x0, y0, x1, y1 = max(0, left), max(0, top), min(size, right), min(size, bottom)
    on_box[y0 - top : y1 - top, x0 - left : x1 - left] = heat[y0:y1, x0:x1]
    box_left, box_top, box_right, box_bottom = geometry.box
    width, height = geometry.slice_size
    out = np.zeros((height, width), dtype=np.float32)
    out[box_top:box_bottom, box_left:box_right] = np.asarray(
        Image.fromarray(on_box, "F").resize(
            (box_right - box_left, box_bottom - box_top), Image.Resampling.BILINEAR
        )
    )
    return out


def view_spec(spec: ModelSpec) -> ModelSpec:
    """The spec that preprocesses images already through ``spec``'s region and resize rules
    (:func:`resized_image`'s output, e.g. serve's uploads decoded off the batch thread): it only
    normalises them. ``spec`` itself would look for the region again inside the cropped view."""
    return spec.replace(region=RegionRule.WHOLE)


def _as_image(source: ImageSource, spec: ModelSpec) -> Image.Image:
    if isinstance(source, Image.Image):
        return _to_color_mode(source, spec.color_mode)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageReadError(
                "<array>", f"expected a uint8 (H, W) or (H, W, 3) array, got {source.dtype} {source.shape}"
            )
        return _to_color_mode(Image.fromarray(source), spec.color_mode)
    return load_image(source, spec)


def preprocess(source: ImageSource, spec: ModelSpec, out: np.ndarray | None = None) -> np.ndarray:
    """A file (path, bytes or binary file object), Pillow image or uint8 array -> the model
    input: (3, S, S) float32, normalised, written into ``out`` when given (a row of a batch
    buffer) and returned.

    Each channel is ``(pixel - mean) / std`` computed in float32 straight from the uint8 image
    into ``out``: no float copy of the image and no (3, S, S) temporaries, whose allocation and
    copies cost more than the resize on a 224 px slice.
    """
    pixels = np.asarray(resized_image(source, spec))  # (S, S) or (S, S, 3) uint8
    size = spec.input_size
    if out is None:
        out = np.empty((3, size, size), dtype=np.float32)
    assert out.shape == (3, size, size) and out.dtype == np.float32, (out.shape, out.dtype)
    if pixels.ndim == 2:  # gray: the same plane feeds the three input channels
        planes = [pixels] * 3
    else:
        order = (2, 1, 0) if spec.channel_order == "BGR" else (0, 1, 2)
        planes = [pixels[..., channel] for channel in order]
    computed: dict[tuple[int, float, float], int] = {}
    for channel, plane in enumerate(planes):
        key = (id(plane), spec.mean[channel], spec.std[channel])
        if key in computed:  # gray with the same normalisation per channel: a copy, not arithmetic
            out[channel] = out[computed[key]]
            continue
        np.subtract(plane, np.float32(spec.mean[channel]), out=out[channel], dtype=np.float32)
        np.divide(out[channel], np.float32(spec.std[channel]), out=out[channel])
        computed[key] = channel
    return out


def preprocess_batch(paths: Sequence[str | Path], spec: ModelSpec) -> np.ndarray:
    """Files -> (N, 3, S, S) float32. Raises ImageReadError on the first unreadable file."""
    size = spec.input_size
    batch = np.empty((len(paths), 3, size, size), dtype=np.float32)
    for index, path in enumerate(paths):
        preprocess(path, spec, out=batch[index])
    return batch


BatchOutput = TypeVar("BatchOutput")


def map_batches(
    paths: Sequence[str | Path],
    spec: ModelSpec,
    batch_size: int,
    run: Callable[[np.ndarray], BatchOutput],
    progress: Callable[[int, int], None] | None = None,
) -> list[BatchOutput]:
    """``run`` on consecutive (n, 3, S, S) float32 batches of ``paths``, in order.

    The one loop that feeds files to a model, whatever the model (onnxruntime, PyTorch).
    ``progress(done, total)`` is called after each batch. Raises ImageReadError on the first
    unreadable file.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    outputs = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        outputs.append(run(preprocess_batch(chunk, spec)))
        if progress is not None:
            progress(start + len(chunk), len(paths))
    return outputs


def describe_image(path: str | Path, spec: ModelSpec | None = None) -> dict[str, Any]:
    """What an image file is: format, size, mode; for DICOM also modality, HU range, window."""
    path = Path(path)
    spec = spec or ModelSpec()
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    if is_dicom_file(path):
        dataset, values = read_dicom(path)
        low, high = dicom_window(dataset, values, spec)
        return {
            "path": str(path),
            "format": "DICOM",
            "size": [int(dataset.Columns), int(dataset.Rows)],
            "modality": str(dataset.get("Modality", "")),
            "photometric": str(dataset.get("PhotometricInterpretation", "")),
            "frames": int(dataset.get("NumberOfFrames", 1) or 1),
            "value_range": [float(values.min()), float(values.max())],
            "value_unit": "HU" if str(dataset.get("Modality", "")).upper() == "CT" else "stored",
            "window": [low, high],
            "transfer_syntax": str(dataset.file_meta.get("TransferSyntaxUID", "")),
        }
    image = load_image(path, spec)  # validates the whole file, not only the header
    with Image.open(path) as raw:
        return {
            "path": str(path),
            "format": raw.format,
            "size": list(raw.size),
            "mode": raw.mode,
            "decoded_as": image.mode,
            "bytes": path.stat().st_size,
        }
