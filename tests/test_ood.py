"""OOD detection: scores against hand-computed values, the threshold rule, the detector's travel
inside ONNX metadata, and `predict` writing `unknown` rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _factories import SIZE, make_tiny_onnx
from scipy.stats import binomtest
from test_runtime import read_rows, write_gray_images

from kidney_edge.errors import ImageReadError, InputError
from kidney_edge.ood import choose_threshold, fit_detector, fit_params
from kidney_edge.runtime.ood import HALF_PRECISION_SIZE, ONNX_OOD_KEY, OodDetector, OodMethod
from kidney_edge.spec import UNKNOWN_LABEL, ModelSpec


def test_msp_and_energy_scores_by_hand() -> None:
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    msp = OodDetector(OodMethod.MSP, 0.4)
    np.testing.assert_allclose(msp.score({"logits": logits}), [0.5, 0.25])  # 1 - max softmax: 1/2, 3/4
    energy = OodDetector(OodMethod.ENERGY, 0.0)
    np.testing.assert_allclose(energy.score({"logits": logits}), [-np.log(2.0), -np.log(4.0)])  # -logsumexp
    assert msp.rejects(msp.score({"logits": logits})).tolist() == [True, False]


def test_mahalanobis_is_the_distance_to_the_nearest_class_mean() -> None:
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 4.0])  # the second axis varies 4x more: distances along it count less
    features = np.concatenate(
        [rng.normal(0, 1, (4000, 2)) * scale, rng.normal(0, 1, (4000, 2)) * scale + [10, 0]]
    )
    labels = np.repeat([0, 1], 4000)
    detector = OodDetector(OodMethod.MAHALANOBIS, 1.0, fit_params("mahalanobis", features, labels, 2))
    probe = np.array([[0.0, 8.0], [2.0, 0.0], [10.0, 0.0]])
    # Under covariance diag(1, 16): (0, 8) is 8/4 = 2 from class 0 -> 4; (2, 0) is 2 -> 4; (10, 0) is on class 1.
    np.testing.assert_allclose(detector.score({"features": probe}), [4.0, 4.0, 0.0], atol=0.25)
    block_stats = OodDetector(OodMethod.BLOCK_STATS, 1.0, detector.params)  # the same score, another input
    np.testing.assert_allclose(block_stats.score({"block_stats": probe}), detector.score({"features": probe}))
    with pytest.raises(InputError, match="`block_stats` output, which this model lacks"):
        block_stats.score({"features": probe})


def test_knn_score_is_one_minus_the_kth_cosine_similarity() -> None:
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    params = fit_params("knn", bank, np.zeros(3, int), 1) | {"k": np.array(2)}
    detector = OodDetector(OodMethod.KNN, 0.5, params)
    # (1, 0): similarities 1, 0, 0.707 -> 2nd highest 0.707
    np.testing.assert_allclose(
        detector.score({"features": np.array([[3.0, 0.0]])}), [1 - np.sqrt(0.5)], atol=1e-6
    )


@pytest.mark.parametrize("n", [20, 180, 1000])
def test_threshold_keeps_the_upper_bound_of_val_rejection_under_target(n: int) -> None:
    scores = np.random.default_rng(n).normal(size=n)
    threshold = choose_threshold(scores, 0.05)
    rejected = int((scores > threshold).sum())
    assert binomtest(rejected, n).proportion_ci(0.95, method="wilson").high <= 0.05 or rejected == 0
    # one more rejection would break the bound: the threshold is the lowest that holds it
    if rejected + 1 < n and rejected > 0:
        assert binomtest(rejected + 1, n).proportion_ci(0.95, method="wilson").high > 0.05
    with pytest.raises(InputError, match="--ood-max-rejection"):
        choose_threshold(scores, 0.0)


def test_detector_round_trips_through_bytes_and_metadata() -> None:
    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(60, 300)), np.repeat([0, 1, 2], 20)
    detector = fit_detector(
        "mahalanobis",
        ({"features": features}, labels),
        {"features": rng.normal(size=(40, 300))},
        3,
    )
    assert detector.params["whitening"].size >= HALF_PRECISION_SIZE  # travels as float16, losslessly
    again = OodDetector.from_metadata(detector.to_metadata())
    assert again == detector and again.record() == detector.record()
    np.testing.assert_array_equal(again.score({"features": features}), detector.score({"features": features}))
    assert detector.n_fit == 60 and detector.n_val == 40
    with pytest.raises(InputError, match="not a valid kidney-edge OOD detector"):
        OodDetector.from_bytes(b"not an npz")


def _model_with_detector(path: Path, detector: OodDetector) -> Path:
    import onnx

    make_tiny_onnx(path, ModelSpec(input_size=SIZE))
    model = onnx.load(str(path))
    model.metadata_props.add(key=ONNX_OOD_KEY, value=detector.to_metadata())
    onnx.save(model, str(path))
    return path


def test_predict_writes_unknown_rows_with_scores_and_no_ood_turns_it_off(tmp_path: Path) -> None:
    from kidney_edge.runtime import OnnxClassifier, PredictOptions, predict_folder

    images = tmp_path / "images"
    write_gray_images(images, 12)
    detector = OodDetector(OodMethod.MSP, 0.2)
    model = _model_with_detector(tmp_path / "m.onnx", detector)
    summary = predict_folder(images, PredictOptions(model=model, out=tmp_path / "p.csv"))
    rows = read_rows(tmp_path / "p.csv")
    probabilities = np.array(
        [[float(r[f"p_{c}"]) for c in ("Cyst", "Normal", "Stone", "Tumor")] for r in rows]
    )
    logits = OnnxClassifier(model).predict_files([r["path"] for r in rows])[0]
    expected = detector.score({"logits": logits})
    np.testing.assert_allclose([float(r["ood_score"]) for r in rows], expected, atol=1e-6)
    unknown = [r["label"] == UNKNOWN_LABEL for r in rows]
    assert unknown == list(expected > 0.2) and 0 < sum(unknown) < len(rows)
    for row, probs in zip(rows, probabilities, strict=True):  # probabilities are still written
        assert row["argmax_label"] == ("Cyst", "Normal", "Stone", "Tumor")[probs.argmax()]
        assert (row["confidence"] == "") == (row["label"] == UNKNOWN_LABEL)
    assert summary.class_counts[UNKNOWN_LABEL] == sum(unknown) and summary.exit_code == 0
    assert summary.ood_detector == detector.describe()

    off = predict_folder(images, PredictOptions(model=model, out=tmp_path / "off.csv", ood=False))
    rows_off = read_rows(tmp_path / "off.csv")
    assert all(r["label"] != UNKNOWN_LABEL and r["ood_score"] == "" for r in rows_off)
    assert UNKNOWN_LABEL not in off.class_counts and off.ood_detector is None


def test_feature_detector_on_a_graph_without_features_is_a_clear_error(tmp_path: Path) -> None:
    from kidney_edge.runtime import OnnxClassifier

    params = {"whitening": np.eye(2, dtype=np.float32), "whitened_means": np.zeros((1, 2), np.float32)}
    model = _model_with_detector(tmp_path / "m.onnx", OodDetector(OodMethod.MAHALANOBIS, 1.0, params))
    with pytest.raises(InputError, match="scores a `features` output the graph lacks"):
        OnnxClassifier(model)
    assert OnnxClassifier(model, ood=False).ood is None


def test_unknown_is_not_a_class_name() -> None:
    with pytest.raises(InputError, match="reserved"):
        ModelSpec(class_names=("Normal", UNKNOWN_LABEL))


def test_foreign_corpus_is_built_offline_and_readable(tmp_path: Path) -> None:
    from kidney_edge.imaging import preprocess
    from kidney_edge.phantoms.foreign import FOREIGN_CSV, KINDS, write_foreign_corpus

    items = write_foreign_corpus(tmp_path / "foreign")
    assert {item.kind for item in items} == set(KINDS) and len(items) >= 50
    assert len((tmp_path / "foreign" / FOREIGN_CSV).read_text().splitlines()) == len(items) + 1
    spec = ModelSpec(input_size=SIZE)
    for item in items:  # every file decodes through the one preprocessing, but colour DICOM
        if item.path.name == "examples_rgb_color.dcm":  # predict writes it an error row
            with pytest.raises(ImageReadError, match="only grayscale slices"):
                preprocess(item.path, spec)
        else:
            assert preprocess(item.path, spec).shape == (3, SIZE, SIZE), item.path
    photo = next(i for i in items if i.path.name == "grace_hopper.png")
    assert json.dumps(photo.source).count("matplotlib") == 1


def test_detector_appended_to_the_graph_scores_as_numpy_does(tmp_path: Path) -> None:
    """export._append_ood_nodes computes in ONNX what OodDetector.score computes in numpy."""
    import onnx
    from onnx import TensorProto, helper

    from kidney_edge.export import _append_ood_nodes
    from kidney_edge.runtime import OnnxClassifier

    path = make_tiny_onnx(tmp_path / "m.onnx", ModelSpec(input_size=SIZE))
    model = onnx.load(str(path))  # expose the pooled input (N, 3) as the block statistics
    model.graph.node.append(helper.make_node("Identity", ["flat"], ["block_stats"]))
    model.graph.output.append(helper.make_tensor_value_info("block_stats", TensorProto.FLOAT, ["N", 3]))
    onnx.save(model, str(path))
    rng = np.random.default_rng(3)
    train = rng.normal(size=(300, 3)) * [1.0, 2.0, 0.5]
    params = fit_params(OodMethod.BLOCK_STATS, train, np.repeat([0, 1, 2], 100), 3)
    detector = OodDetector(OodMethod.BLOCK_STATS, 5.0, params)
    _append_ood_nodes(path, detector)
    batch = rng.normal(size=(6, 3, SIZE, SIZE)).astype(np.float32) * 3
    outputs = OnnxClassifier(path, ood=False).infer(batch, block_stats=True)
    import onnxruntime as ort

    graph_scores = ort.InferenceSession(str(path)).run(["ood_score"], {"input": batch})[0]
    expected = detector.score({"block_stats": outputs.block_stats})  # float32 sums: 1e-4 apart
    np.testing.assert_allclose(graph_scores, expected, rtol=1e-4, atol=1e-4)
