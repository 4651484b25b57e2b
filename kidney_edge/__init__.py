"""kidney-edge: kidney CT slice classification from training to a CPU-only edge machine.

``import kidney_edge`` stays light: torch, onnx and onnxruntime are imported only by the
functions that need them, so the edge runtime works without PyTorch installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from kidney_edge.errors import ImageReadError, InputError, KidneyEdgeError
from kidney_edge.spec import DecisionRule, ModelSpec

__all__ = [
    "DecisionRule",
    "ImageReadError",
    "InputError",
    "KidneyEdgeError",
    "ModelSpec",
    "__version__",
    "create_model",
]

if TYPE_CHECKING:  # pragma: no cover
    from kidney_edge.backbones import create_model


def __getattr__(name: str) -> Any:
    # create_model needs torch: resolve it lazily so the runtime path never imports torch.
    if name == "create_model":
        from kidney_edge.backbones import create_model

        return create_model
    raise AttributeError(f"module 'kidney_edge' has no attribute {name!r}")
