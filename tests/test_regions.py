"""The spec's region rule: the kidney band found from the image alone, and what keeps the whole."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kidney_edge.imaging import heat_on_slice, preprocess, resized_image, to_view
from kidney_edge.regions import region_box
from kidney_edge.spec import ModelSpec, RegionRule, ResizeRule


def axial_slice(width: int = 400, height: int = 300) -> Image.Image:
    """Air, a body ellipse, a bright vertebra low in the middle and two kidneys beside it."""
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 40, width - 20, height - 30), fill=90)  # body: x 20..380, y 40..270
    draw.ellipse((180, 175, 220, 215), fill=255)  # vertebral body centred at (200, 195)
    draw.ellipse((90, 150, 150, 220), fill=140)  # right kidney
    draw.ellipse((250, 150, 310, 220), fill=140)  # left kidney
    draw.ellipse((60, 55, 180, 105), fill=120)  # liver, anterior: outside the band
    return image


def test_kidney_band_about_the_spine_holds_both_kidneys_and_drops_the_front() -> None:
    box = region_box(axial_slice(), RegionRule.KIDNEYS)
    assert box is not None
    left, top, right, bottom = box
    # Body box 360 x 230 px about the spine centre (200, 195): 0.42 x 360 = 151 to each side,
    # 0.30 x 230 = 69 up, 0.22 x 230 = 51 down (within a thumbnail pixel of the finder).
    assert left == pytest.approx(200 - 151, abs=4) and right == pytest.approx(200 + 151, abs=4)
    assert top == pytest.approx(195 - 69, abs=4) and bottom == pytest.approx(195 + 51, abs=4)
    assert left < 90 and right > 310 and top < 150 and bottom > 220  # both kidneys inside
    assert top > 105  # the liver (lower edge y 105) and what is in front of it are cut away
    assert region_box(axial_slice(), RegionRule.WHOLE) is None


def coronal_slice() -> Image.Image:
    """A coronal view: the spine is a column from the pelvis to the chest, kidneys high beside it."""
    image = Image.new("L", (400, 400), 0)
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 30, 340, 380), fill=90)  # trunk
    draw.rectangle((188, 60, 212, 370), fill=255)  # spinal column
    draw.ellipse((110, 90, 170, 190), fill=140)  # right kidney
    draw.ellipse((230, 90, 290, 190), fill=140)  # left kidney
    return image


@pytest.mark.parametrize(
    "image",
    [
        coronal_slice(),  # a band about the column's middle would cut the kidneys off
        Image.new("L", (300, 300), 0),  # all air
        Image.new("L", (300, 300), 90),  # no air above and below: a crop, not a slice
        Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (200, 1))),  # a ramp fills the frame
    ],
    ids=["coronal", "air", "crop", "ramp"],
)
def test_images_without_a_body_and_spine_stay_whole(image: Image.Image) -> None:
    assert region_box(image, RegionRule.KIDNEYS) is None


def test_the_spec_carries_the_rule_into_preprocessing(tmp_path: Path) -> None:
    path = tmp_path / "slice.png"
    axial_slice().save(path)
    kidneys = ModelSpec(input_size=64, region=RegionRule.KIDNEYS)
    whole = ModelSpec(input_size=64)
    box = region_box(axial_slice(), RegionRule.KIDNEYS)
    expected = resized_image(axial_slice().crop(box), whole)
    assert np.array_equal(np.asarray(resized_image(path, kidneys)), np.asarray(expected))
    assert not np.array_equal(preprocess(path, kidneys), preprocess(path, whole))
    # The spec round-trips the rule; a whole-slice spec does not write the field at all, so
    # kidney-edge versions that predate it still read whole-slice models.
    assert ModelSpec.from_json(kidneys.to_json()).region is RegionRule.KIDNEYS
    assert "region" not in whole.to_dict() and kidneys.to_dict()["region"] == "kidneys"
    assert ModelSpec.from_dict({**whole.to_dict()}).region is RegionRule.WHOLE


@pytest.mark.parametrize("style", ["classic", "lookalike"])
def test_band_holds_the_findings_of_both_phantom_renderers(tmp_path: Path, style: str) -> None:
    from kidney_edge.phantoms.styles import synthesizer

    synthesizer(style)(tmp_path, n=40, seed=3, size=256)
    with open(tmp_path / "phantom_truth.csv", newline="") as handle:
        findings = [row for row in csv.DictReader(handle) if row["lesion_x"]]
    assert len(findings) >= 15
    centres, whole = 0, 0
    for row in findings:
        with Image.open(tmp_path / row["path"]) as image:
            box = region_box(image, RegionRule.KIDNEYS)
        assert box is not None, row["path"]
        x, y, radius = float(row["lesion_x"]), float(row["lesion_y"]), float(row["lesion_radius_px"])
        centres += box[0] <= x <= box[2] and box[1] <= y <= box[3]
        whole += (
            box[0] <= x - radius and x + radius <= box[2] and box[1] <= y - radius and y + radius <= box[3]
        )
        # The band drops the front and the back of the slice: at most 40% of its height.
        assert box[3] - box[1] <= 0.4 * image.height
    # Every lesion's centre is in the band; a tumour bulging out toward the flank may be cut
    # (91.5% whole on 460 look-alike findings, benchmarks/results/region.md).
    assert centres == len(findings) and whole >= 0.7 * len(findings)


@pytest.mark.parametrize("resize", list(ResizeRule))
@pytest.mark.parametrize("region", list(RegionRule))
def test_a_map_over_the_view_lands_where_the_slice_shows_it(resize: ResizeRule, region: RegionRule) -> None:
    """An activation map drawn over the model's view is drawn back onto the slice: a spot beside
    the spine maps back to where the slice shows it, and nothing the model did not see lights up."""
    image = axial_slice()
    spotted = image.copy()
    ImageDraw.Draw(spotted).ellipse((241, 161, 249, 169), fill=255)  # a "stone" at (245, 165)
    spec = ModelSpec(input_size=64, region=region, resize=resize)
    view, geometry = to_view(image, spec)
    assert np.array_equal(np.asarray(view), np.asarray(resized_image(image, spec)))
    spotted_view, spotted_geometry = to_view(spotted, spec)
    assert spotted_geometry == geometry
    heat = np.abs(np.asarray(spotted_view, dtype=np.float32) - np.asarray(view, dtype=np.float32))  # the spot
    on_slice = heat_on_slice(heat, geometry)
    assert on_slice.shape == (300, 400)
    y, x = np.unravel_index(np.argmax(on_slice), on_slice.shape)
    assert abs(x - 245) <= 6 and abs(y - 165) <= 6
    left, top, right, bottom = geometry.box
    outside = np.ones_like(on_slice, dtype=bool)
    outside[top:bottom, left:right] = False
    assert not on_slice[outside].any()
    if region is RegionRule.KIDNEYS:
        assert geometry.box == region_box(image, region) and top > 105
