"""DICOM CT through the one preprocessing path: Hounsfield units, windows, photometry, bad files.

Skipped as a whole without the ``dicom`` extra (pydicom); every other imaging test lives in
test_imaging.py and runs without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from test_imaging import pixels_of  # noqa: E402

from kidney_edge.errors import ImageReadError  # noqa: E402
from kidney_edge.imaging import describe_image, is_image_file, preprocess  # noqa: E402
from kidney_edge.spec import CTWindow, ModelSpec  # noqa: E402


def make_ct_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    photometric: str = "MONOCHROME2",
    modality: str = "CT",
    transfer_syntax: str | None = None,
    pixel_bytes: bytes | None = None,
) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality, ds.PhotometricInterpretation = modality, photometric
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    frames = stored if stored.ndim == 3 else stored[None]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixel_bytes if pixel_bytes is not None else frames.astype("<u2").tobytes()
    if pixel_bytes is not None:
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


SPEC_CT = ModelSpec(input_size=32, resize="stretch")  # window level 40, width 400 -> [-160, 240] HU


def window_value(hu: float, level: float = 40.0, width: float = 400.0) -> int:
    low = level - width / 2
    return int(np.rint(np.clip((hu - low) / width, 0, 1) * 255))


def test_dicom_hounsfield_units_map_through_the_window(tmp_path: Path) -> None:
    stored = np.full((32, 32), 1040, np.uint16)  # 1040 * 1 - 1024 = 16 HU
    stored[:16] = 0  # -1024 HU (air) -> 0
    stored[:, :4] = 3000  # 1976 HU (bone) -> 255
    path = make_ct_dicom(tmp_path / "ct.dcm", stored)
    values = pixels_of(preprocess(path, SPEC_CT), SPEC_CT)[0]
    assert window_value(16) == 112
    np.testing.assert_allclose(values[20, 10], 112, atol=1e-4)
    np.testing.assert_allclose(values[5, 10], 0, atol=1e-4)
    np.testing.assert_allclose(values[20, 1], 255, atol=1e-4)
    bone_window = SPEC_CT.replace(ct_window=CTWindow(level=400, width=1800))
    np.testing.assert_allclose(
        pixels_of(preprocess(path, bone_window), bone_window)[0, 20, 10],
        window_value(16, 400, 1800),
        atol=1e-4,
    )


def test_dicom_slope_monochrome1_and_multiframe(tmp_path: Path) -> None:
    stored = np.full((32, 32), 520, np.uint16)  # 520 * 2 - 1024 = 16 HU
    inverted = make_ct_dicom(tmp_path / "m1.dcm", stored, slope=2.0, photometric="MONOCHROME1")
    np.testing.assert_allclose(pixels_of(preprocess(inverted, SPEC_CT), SPEC_CT)[0], 255 - 112, atol=1e-4)
    volume = np.stack([np.full((32, 32), v, np.uint16) for v in (0, 1040, 3000)])
    multi = make_ct_dicom(tmp_path / "multi.dcm", volume)
    np.testing.assert_allclose(
        pixels_of(preprocess(multi, SPEC_CT), SPEC_CT)[0], 112, atol=1e-4
    )  # middle frame


def test_dicom_without_suffix_is_detected(tmp_path: Path) -> None:
    path = make_ct_dicom(tmp_path / "IM0001", np.full((32, 32), 1040, np.uint16))
    assert is_image_file(path)
    uid_named = make_ct_dicom(tmp_path / "1.2.840.113619.2.55.3", np.full((32, 32), 1040, np.uint16))
    assert is_image_file(uid_named)
    np.testing.assert_allclose(pixels_of(preprocess(path, SPEC_CT), SPEC_CT)[0], 112, atol=1e-4)


def test_pydicom_real_ct_slice() -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    spec = ModelSpec(input_size=int(ds.Rows), resize="stretch")  # no resize: pixel-exact comparison
    expected = np.rint(np.clip((hu + 160) / 400, 0, 1) * 255)
    np.testing.assert_allclose(pixels_of(preprocess(path, spec), spec)[0], expected, atol=1e-3)
    info = describe_image(path)
    assert info["modality"] == "CT" and info["value_unit"] == "HU" and info["window"] == [-160.0, 240.0]
    assert info["value_range"] == [float(hu.min()), float(hu.max())]


def test_pydicom_truncated_file_is_a_clear_error() -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(ImageReadError, match="truncated") as info:
        preprocess(path, SPEC_CT)
    assert "MR_truncated.dcm" in str(info.value)


def test_dicom_compressed_without_decoder_names_the_missing_decoder(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    path = make_ct_dicom(
        tmp_path / "jls.dcm",
        np.zeros((32, 32), np.uint16),
        transfer_syntax=JPEGLSLossless,
        pixel_bytes=encapsulate([b"\xff\xd8not-really-jpeg-ls\xff\xd9"]),
    )
    with pytest.raises(ImageReadError, match="decoder") as info:
        preprocess(path, SPEC_CT)
    assert "JPEG-LS" in str(info.value) and "jls.dcm" in str(info.value)
