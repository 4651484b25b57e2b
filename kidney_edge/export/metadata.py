"""An ONNX file's ``metadata_props``: the spec (everything predict needs) written at export,
and entries set later (the OOD detector).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kidney_edge.spec import ONNX_METADATA_KEY, ModelSpec


def add_spec_metadata(proto: Any, spec: ModelSpec, exporter: str) -> None:
    """Replace ``proto``'s metadata with the spec, class names, outputs in words and exporter; set its producer."""
    import json

    from kidney_edge import __version__

    del proto.metadata_props[:]
    entries = {
        ONNX_METADATA_KEY: spec.to_json(),  # everything predict needs: preprocessing, classes, decision
        "class_names": json.dumps(list(spec.class_names)),  # for tools that do not know kidney-edge
        "kidney_edge.outputs": (
            "logits: raw scores; probabilities: softmax(logits / temperature); features: pooled "
            "penultimate features; block_stats: channel means and stds of three backbone blocks (OOD "
            "detector input); cam: class activation maps (classifier weights on the last feature map)"
        ),
        "kidney_edge.exporter": exporter,
    }
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "kidney-edge", __version__
    proto.doc_string = (
        f"kidney-edge {spec.arch} CT slice classifier ({', '.join(spec.class_names)}), input "
        f"{spec.input_size}px; spec JSON in metadata_props[{ONNX_METADATA_KEY!r}]."
    )


def set_metadata(onnx_path: Path, entries: dict[str, str]) -> None:
    """Set (add or replace) ``metadata_props`` entries of an ONNX file, atomically."""
    import onnx

    from kidney_edge.io_utils import atomic_write_bytes

    proto = onnx.load(str(onnx_path))
    kept = [(prop.key, prop.value) for prop in proto.metadata_props if prop.key not in entries]
    del proto.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        proto.metadata_props.add(key=key, value=value)
    atomic_write_bytes(onnx_path, proto.SerializeToString())
