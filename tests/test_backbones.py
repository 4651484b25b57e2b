"""Backbones (registry, offline ImageNet weights, phase parameter groups) and plain-data checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kidney_edge import InputError, ModelSpec
from kidney_edge import backbones as bb
from kidney_edge.backbones import backbone_spec_defaults, create_model
from kidney_edge.checkpoint import load_checkpoint, load_model, save_checkpoint, update_spec
from kidney_edge.spec import ResizeRule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    return create_model("efficientnet_lite0", num_classes=1000).eval()


def test_lite0_imagenet_weights_classify_grace_hopper(lite0_imagenet) -> None:
    from matplotlib import cbook

    from kidney_edge.imaging import preprocess

    photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    spec = ModelSpec(
        color_mode="rgb", **{**backbone_spec_defaults("efficientnet_lite0"), "resize": "center_crop"}
    )
    batch = torch.from_numpy(preprocess(photo, spec))[None]  # (1, 3, 224, 224)
    with torch.no_grad():
        probabilities = lite0_imagenet(batch).softmax(1)[0]
    assert int(probabilities.argmax()) == 652  # ImageNet "military uniform"
    assert float(probabilities[652]) > 0.25  # 0.32 measured; random weights give ~0.001


def test_lite0_weights_map_onto_every_key_exactly() -> None:
    raw = torch.load(bb.lite0_weights_path(), map_location="cpu", weights_only=True)
    mapped = {bb._lite0_key(k) for k in raw}
    model = bb._build_lite0(1000)
    assert mapped == set(model.state_dict())  # zero missing, zero unexpected
    assert len(raw) == len(mapped) == 296


def test_lite0_uses_tf_normalisation_and_asymmetric_same_padding() -> None:
    defaults = backbone_spec_defaults("efficientnet_lite0")
    assert defaults == {"mean": (127.0,) * 3, "std": (128.0,) * 3, "resize": ResizeRule.LETTERBOX}
    stride2 = bb._same_padding(5, 2)
    assert stride2.padding == (1, 2, 1, 2)  # TF puts the odd pixel right/bottom
    assert bb._same_padding(3, 1).padding == (1, 1, 1, 1)


def test_b0_loads_weights_file_in_torchvision_key_names(tmp_path: Path) -> None:
    from torchvision.models import efficientnet_b0

    torch.manual_seed(0)
    reference = efficientnet_b0(weights=None).eval()
    weights = tmp_path / "b0.pth"
    torch.save(reference.state_dict(), weights)
    model = create_model("efficientnet_b0", num_classes=1000, weights=weights).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert backbone_spec_defaults("efficientnet_b0")["mean"] == pytest.approx((123.675, 116.28, 103.53))


def test_b0_without_cached_weights_says_how_to_get_them(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(InputError, match=r"--weights FILE.*--no-pretrained"):
        create_model("efficientnet_b0")
    assert create_model("efficientnet_b0", pretrained=False).num_classes == 4


def test_registry_rejects_unknown_and_duplicate_names() -> None:
    with pytest.raises(InputError, match="efficientnet_lite0_pair, efficientnet_lite0, efficientnet_b0"):
        create_model("resnet50")
    with pytest.raises(Exception, match="already registered"):
        bb.register_backbone("efficientnet_lite0", bb._REGISTRY["efficientnet_lite0"])


def test_imagenets_classifier_is_kept_only_where_it_fits_the_head(lite0_imagenet) -> None:
    pair = create_model("efficientnet_lite0_pair", num_classes=1000)  # 1,000 classes, two pooled maps
    imagenet = lite0_imagenet.classifier.weight
    assert pair.classifier.weight.shape == (1000, 2 * 1280)  # a fresh head of the pair's shape ...
    assert (
        float(pair.classifier.weight.detach().std()) < 0.02 < float(imagenet.detach().std())
    )  # ... at its initial scale
    torch.testing.assert_close(pair.stem.conv.weight, lite0_imagenet.stem.conv.weight)  # the backbone loaded


def test_a_pair_model_compares_the_mirrored_halves_of_its_view() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0_pair", num_classes=4, pretrained=False).eval()
    assert backbone_spec_defaults("efficientnet_lite0_pair")["resize"] is ResizeRule.STRETCH
    view = torch.randn(2, 3, 64, 64)
    symmetric = torch.cat([view[..., :32], view[..., :32].flip(-1)], dim=-1)  # right half = mirrored left
    with torch.no_grad():
        features = model.pool_features(model.forward_features(view))  # (2, 2F)
        mirrored = model.pool_features(model.forward_features(view.flip(-1)))  # the halves swapped
        alike = model.pool_features(model.forward_features(symmetric))
        left = model.halves(view)[::2]  # (2, 3, 32, 32): the left halves, squared
        half = bb.KidneyNet.pool_features(model, bb.KidneyNet.forward_features(model, left))
    tiles = model.halves(symmetric)  # left, mirrored right, per view: one kidney each, squared
    assert (
        tiles.shape == (4, 3, 32, 32)
        and torch.equal(tiles[0], tiles[1])
        and not torch.equal(tiles[0], tiles[2])
    )
    assert features.shape == (2, 2 * 1280) and model.classifier.in_features == 2 * 1280
    torch.testing.assert_close(mirrored, features)  # which kidney holds the finding does not matter
    assert float(alike[:, 1280:].abs().max()) == 0.0  # what both halves show cancels in the difference
    assert float(features[:, 1280:].abs().min()) >= 0 and float(features[:, 1280:].max()) > 0
    torch.testing.assert_close(alike[:, :1280], half)  # the mean part: a half's own pooled features


def test_a_pair_models_class_maps_add_up_to_its_logits() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0_pair", num_classes=4, pretrained=False).eval()
    torch.nn.init.normal_(model.classifier.weight, std=0.5)  # a trained head: weights far from 0
    view = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        feature_map = model.forward_features(view)  # (3, F, 2, 2 * 2): the halves side by side
        maps = model.class_activation_maps(feature_map)
        logits = model(view)
    assert maps.shape == (3, 4, *feature_map.shape[2:])
    torch.testing.assert_close(maps.mean(dim=(2, 3)) + model.classifier.bias, logits, atol=1e-5, rtol=1e-5)
    # Grad-CAM's layer is the joined map, shaped as the view: one map over the whole view
    from kidney_edge.gradcam import grad_cam

    heat = grad_cam(model, view.numpy(), torch.zeros(3, dtype=torch.long).numpy())
    assert heat.shape == (3, 96, 96)


def test_drop_path_skips_residual_branches_in_training_only() -> None:
    """Block i of n drops its residual branch with rate * i / n (torchvision's B0 rule, which
    B0 keeps by default); evaluation, hence export, sees every block."""
    b0 = create_model("efficientnet_b0", pretrained=False)
    torchvision_rates = [m.stochastic_depth.p for m in b0.modules() if hasattr(m, "stochastic_depth")]
    bb.set_drop_path(b0, 0.2)
    assert [m.stochastic_depth.p for m in b0.modules() if hasattr(m, "stochastic_depth")] == torchvision_rates

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0")  # ImageNet weights: activations of a realistic scale
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        plain = model.eval().forward_features(x)
        bb.set_drop_path(model, 0.9)
        assert [round(b.drop_path, 4) for b in model.blocks] == [round(0.9 * i / 16, 4) for i in range(16)]
        torch.testing.assert_close(model.forward_features(x), plain)  # eval: no block dropped
        for module in model.modules():  # training mode for the blocks, BatchNorm left on its statistics
            module.train(not isinstance(module, torch.nn.BatchNorm2d))
        dropped = model.forward_features(x)
        bb.set_drop_path(model, 0.0)
        torch.testing.assert_close(model.forward_features(x), plain)
    assert (dropped - plain).abs().mean() > 0.1 * plain.abs().mean()


def test_torch_free_arch_names_are_the_registered_backbones() -> None:
    from kidney_edge.archs import ARCHS

    assert bb.available_archs() == ARCHS  # the CLI's --arch choices build without importing torch


def test_bad_weights_file_is_an_input_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pth"):
        create_model(weights=junk)
    with pytest.raises(InputError, match="does not exist"):
        create_model(weights=tmp_path / "missing.pth")


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_b0"])
def test_phase_parameter_groups_and_feature_shapes(arch: str) -> None:
    model = create_model(arch, num_classes=4, pretrained=False).eval()
    assert len(model.blocks) == 16
    head = {id(p) for p in model.head_parameters()}
    assert head == {id(model.classifier.weight), id(model.classifier.bias)}
    assert list(model.last_blocks_parameters(0)) == []
    last3 = {id(p) for p in model.last_blocks_parameters(3)}
    expected = [*model.blocks[13].parameters(), *model.blocks[15].parameters(), *model.conv_head.parameters()]
    assert {id(p) for p in expected} <= last3
    assert not last3 & {id(p) for p in model.blocks[12].parameters()}
    with pytest.raises(InputError, match="--unfreeze-blocks must be in 0..16"):
        model.last_blocks_modules(17)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 1280, 2, 2)
        assert torch.equal(model.forward_head(features), model.forward_head(model.pool_features(features)))
        assert torch.equal(model(x), model.forward_head(features))
    assert model.cam_layer is model.conv_head


def test_public_factory_is_reexported() -> None:
    import kidney_edge

    assert kidney_edge.create_model is create_model


# --- checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trip_is_plain_data(tmp_path: Path) -> None:
    model = create_model(pretrained=False, num_classes=3).eval()
    spec = ModelSpec(class_names=("a", "b", "c"), input_size=64)
    path = tmp_path / "model.pt"
    save_checkpoint(
        path, model=model, spec=spec, config={"seed": 1}, extra={"epoch": 2, "rng": torch.get_rng_state()}
    )
    raw = torch.load(path, weights_only=True)  # must not need any allow-listed class
    assert raw["format"] == "kidney-edge-checkpoint" and raw["format_version"] == 1
    assert raw["config"] == {"seed": 1} and raw["epoch"] == 2
    loaded, loaded_spec = load_model(path)
    assert loaded_spec == spec and not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    update_spec(path, spec.replace(temperature=1.7))
    assert load_checkpoint(path)["spec"]["temperature"] == 1.7
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # atomic writes leave no temp files


def test_checkpoint_refuses_non_plain_objects(tmp_path: Path) -> None:
    model = create_model(pretrained=False)
    with pytest.raises(InputError, match="not plain data"):
        save_checkpoint(tmp_path / "x.pt", model=model, spec=ModelSpec(), config={"path": tmp_path})
    assert not (tmp_path / "x.pt").exists()


def test_bad_checkpoints_are_input_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    torch.save({"format": "kidney-edge-checkpoint", "format_version": 99}, tmp_path / "future.pt")
    cases = {"missing.pt": "does not exist", "junk.pt": "not a readable", "foreign.pt": "not a kidney-edge",
             "future.pt": "upgrade kidney-edge"}  # fmt: skip
    for name, message in cases.items():
        with pytest.raises(InputError, match=re.escape(message)):
            load_checkpoint(tmp_path / name)
