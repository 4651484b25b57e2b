"""A corpus of inputs that are not kidney CT slices, built offline, to test "unknown" detection.

Every image comes from a package already installed or is drawn here; nothing is downloaded:

- ``photo``: matplotlib's bundled sample photos (grace_hopper.jpg and others), whole and cropped;
- ``mr``: pydicom's bundled real MR test files (and matplotlib's s1045.ima MR slice);
- ``ultrasound``: pydicom's bundled ultrasound test files;
- ``terrain``: matplotlib's bundled elevation maps, shown as grayscale images;
- ``frame``: uniform, noise and gradient frames, checkerboards;
- ``text``: screenshots of text, dark on light and light on dark;
- ``colour``: colour bars and random coloured shapes.

``write_foreign_corpus(OUT)`` writes ``OUT/<kind>/<name>`` and ``OUT/foreign.csv`` (path, kind,
source). Real CT from other anatomy (pydicom's ``CT_small.dcm``) is written as kind
``other_ct``: it is foreign to a model trained on kidney slices, but anatomy a user may still
expect to be read, so figures report it apart. The colour ultrasound file is one predict cannot
read (colour DICOM): it gets an error row, not a label.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kidney_edge.errors import InputError
from kidney_edge.io_utils import atomic_write_csv

log = logging.getLogger(__name__)

FOREIGN_CSV = "foreign.csv"
KINDS = ("photo", "mr", "ultrasound", "terrain", "frame", "text", "colour", "other_ct")
_PYDICOM_FILES = {
    "mr": ("MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"),
    "ultrasound": ("examples_rgb_color.dcm", "examples_palette.dcm"),
    "other_ct": ("CT_small.dcm",),
}
_MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
_TEXT = (
    "kidney-edge predict FOLDER --model export/run/model.onnx",
    "Traceback (most recent call last): File main.py, line 12",
    "Patient list  |  Study date  |  Modality  |  Series",
    "The quick brown fox jumps over the lazy dog 0123456789",
    "Radiology report: no acute abnormality. Impression: normal.",
)


@dataclass(frozen=True)
class ForeignImage:
    path: Path
    kind: str
    source: str


def _sample_data_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data"


def _save(image: Image.Image, out: Path, kind: str, name: str, source: str) -> ForeignImage:
    path = out / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return ForeignImage(path, kind, source)


def _photos(out: Path, rng: np.random.Generator) -> list[ForeignImage]:
    items = []
    for name in _MATPLOTLIB_PHOTOS:
        photo = Image.open(_sample_data_dir() / name).convert("RGB")
        stem = Path(name).stem
        items.append(_save(photo, out, "photo", f"{stem}.png", f"matplotlib sample_data/{name}"))
        width, height = photo.size
        for i in range(3):  # crops of half the short side: other content of the same photo
            side = min(width, height) // 2
            x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            crop = photo.crop((x, y, x + side, y + side))
            items.append(
                _save(crop, out, "photo", f"{stem}_crop{i}.jpg", f"matplotlib sample_data/{name} crop")
            )
    return items


def _pydicom_files(out: Path) -> list[ForeignImage]:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # the dicom extra is not installed: no DICOM files in the corpus
        log.warning("pydicom is not installed: the foreign corpus has no DICOM files")
        return []
    items = []
    for kind, names in _PYDICOM_FILES.items():
        for name in names:
            source = get_testdata_file(name)
            if source is None:
                raise InputError(f"pydicom's bundled test file {name} is missing; reinstall pydicom")
            path = out / kind / name
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)
            items.append(ForeignImage(path, kind, f"pydicom test file {name}"))
    return items


def _matplotlib_mr(out: Path) -> list[ForeignImage]:
    raw = np.frombuffer(gzip.open(_sample_data_dir() / "s1045.ima.gz").read(), np.uint16)
    side = int(np.sqrt(raw.size))
    mr = raw[: side * side].reshape(side, side).astype(np.float64)
    return [_save(_to_gray(mr), out, "mr", "s1045_mr.png", "matplotlib sample_data/s1045.ima.gz")]


def _to_gray(values: np.ndarray) -> Image.Image:
    low, high = np.percentile(values, (1, 99))
    scaled = np.clip((values - low) / max(high - low, 1e-9), 0, 1)
    return Image.fromarray((scaled * 255).astype(np.uint8), mode="L")


def _terrain(out: Path) -> list[ForeignImage]:
    items = []
    for name in ("topobathy.npz", "jacksboro_fault_dem.npz"):
        with np.load(_sample_data_dir() / name) as archive:
            elevation = archive[archive.files[0]].astype(np.float64)
        items.append(
            _save(_to_gray(elevation), out, "terrain", f"{Path(name).stem}.png", f"matplotlib {name}")
        )
    return items


def _frames(out: Path, rng: np.random.Generator, size: int) -> list[ForeignImage]:
    ramp = np.linspace(0, 255, size)
    yy, xx = np.mgrid[0:size, 0:size] - size / 2
    frames = {
        "black": np.zeros((size, size)),
        "white": np.full((size, size), 255.0),
        "gray": np.full((size, size), 128.0),
        "gradient_h": np.tile(ramp, (size, 1)),
        "gradient_v": np.tile(ramp[:, None], (1, size)),
        "radial": 255 * np.clip(np.hypot(xx, yy) / (size / 2), 0, 1),
        "checker": 255.0 * ((np.indices((size, size)) // 32).sum(axis=0) % 2),
    }
    for i in range(4):
        frames[f"noise_gauss{i}"] = np.clip(rng.normal(128, 20 + 20 * i, (size, size)), 0, 255)
        frames[f"noise_salt{i}"] = 255.0 * (rng.random((size, size)) < 0.05 * (i + 1))
    return [
        _save(Image.fromarray(values.astype(np.uint8), mode="L"), out, "frame", f"{name}.png", "drawn")
        for name, values in frames.items()
    ]


def _text(out: Path, size: int) -> list[ForeignImage]:
    font = ImageFont.load_default(size=18)
    items = []
    for dark_on_light in (True, False):
        background, ink = (245, 20) if dark_on_light else (20, 230)
        for i in range(len(_TEXT)):
            image = Image.new("L", (size, size), background)
            draw = ImageDraw.Draw(image)
            for line in range(12):
                draw.text((12, 12 + 40 * line), _TEXT[(i + line) % len(_TEXT)], fill=ink, font=font)
            name = f"text_{'light' if dark_on_light else 'dark'}{i}.png"
            items.append(_save(image, out, "text", name, "drawn text"))
    return items


def _colour(out: Path, rng: np.random.Generator, size: int) -> list[ForeignImage]:
    bars = np.zeros((size, size, 3), np.uint8)
    palette = [
        (255, 255, 255),
        (255, 255, 0),
        (0, 255, 255),
        (0, 255, 0),
        (255, 0, 255),
        (255, 0, 0),
        (0, 0, 255),
    ]
    for i, colour in enumerate(palette):
        bars[:, i * size // 7 : (i + 1) * size // 7] = colour
    items = [_save(Image.fromarray(bars), out, "colour", "colour_bars.png", "drawn")]
    for i in range(8):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = rng.integers(0, size, 2)
            x1, y1 = x0 + rng.integers(20, size // 2), y0 + rng.integers(20, size // 2)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((int(x0), int(y0), int(x1), int(y1)), fill=fill)
        items.append(_save(image, out, "colour", f"shapes{i}.jpg", "drawn"))
    return items


def write_foreign_corpus(
    out: str | os.PathLike[str], *, seed: int = 0, size: int = 512
) -> list[ForeignImage]:
    """Write the corpus under ``out`` (see the module docstring) and return its images."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    items = [
        *_photos(out, rng),
        *_pydicom_files(out),
        *_matplotlib_mr(out),
        *_terrain(out),
        *_frames(out, rng, size),
        *_text(out, size),
        *_colour(out, rng, size),
    ]
    rows = [
        {"path": str(item.path.relative_to(out)), "kind": item.kind, "source": item.source} for item in items
    ]
    atomic_write_csv(out / FOREIGN_CSV, rows, ["path", "kind", "source"])
    return items
