"""Options of ``kidney-edge export`` (:class:`ExportConfig`) and what an export wrote (:class:`ExportResult`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from kidney_edge.errors import InputError, enum_choice
from kidney_edge.int8_gate import Int8GateConfig
from kidney_edge.quantize import MIN_CALIBRATION_IMAGES, QuantizationConfig
from kidney_edge.spec import ModelSpec

MIN_OPSET = 17
Progress = Callable[[str, int, int], None]  # (stage, done, total)


class Exporter(str, Enum):
    """Which torch.onnx exporter writes the graph (both are then simplified, see :func:`_simplify`).

    ``torchscript`` (``dynamo=False``) is the default, by measurement on torch 2.14.1, 2 busy
    cores: it exports Lite0 or B0 in ~1-3 s against 16-50 s for dynamo, and writes opset 17
    directly (dynamo implements opset >= 18 only; its down-conversion to 17 fails). Its raw
    Lite0 graph is messy (452 nodes: "same" padding as constant subgraphs + Pad), but after
    onnxruntime's basic optimiser it has exactly the ops of dynamo's graph (49 Conv, 33 Clip,
    9 Add, pool, Gemm, Div, Softmax) and runs equally fast. ``dynamo`` stays selectable
    (opset >= 18), and export falls back to it when the deprecated TorchScript exporter fails.
    """

    TORCHSCRIPT = "torchscript"
    DYNAMO = "dynamo"


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``kidney-edge export``; messages name the CLI flags."""

    int8: bool = True
    allow_int8_drop: bool = False
    require_int8: bool = False  # a rejected INT8 fails the export instead of shipping fp32 only
    splits: Path | None = None
    images: tuple[Path, ...] = ()
    calibration_images: int = MIN_CALIBRATION_IMAGES
    opset: int = MIN_OPSET
    parity_batch_size: int = 8
    max_parity_images: int = 256
    exporter: Exporter = Exporter.TORCHSCRIPT
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    gate: Int8GateConfig = field(default_factory=Int8GateConfig)
    int8_repair: bool = True  # keep the most sensitive blocks fp32 until the gate passes (see int8_repair)
    ood: bool = True  # carry the run's OOD detector (fitted here for runs that have none)
    seed: int = 0

    def __post_init__(self) -> None:
        import onnx

        set_ = object.__setattr__
        set_(self, "images", tuple(Path(p) for p in self.images))
        if self.splits is not None:
            set_(self, "splits", Path(self.splits))
        set_(self, "exporter", enum_choice(Exporter, self.exporter, "--exporter"))
        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= self.opset <= newest:
            raise InputError(f"--opset must be in {MIN_OPSET}..{newest} (this onnx), got {self.opset}")
        if self.calibration_images < 1:
            raise InputError(f"--calibration-images must be >= 1, got {self.calibration_images}")
        if self.require_int8 and not self.int8:
            raise InputError("--require-int8 asks for the INT8 file that --no-int8 turns off; drop one of them")
        if not 2 <= self.parity_batch_size <= 256:
            # Batch 1 is the export's own batch size: parity there would not test the dynamic axis.
            raise InputError(f"--parity-batch-size must be in 2..256, got {self.parity_batch_size}")
        if self.max_parity_images < 1:
            raise InputError(f"--parity-images must be >= 1, got {self.max_parity_images}")
        if self.splits is not None and not self.splits.is_file():
            raise InputError(f"--splits {self.splits} does not exist; pass the run's splits.csv")


@dataclass
class ExportResult:
    """What an export wrote. ``int8_path`` is None when INT8 was off or rejected by the gate."""

    out_dir: Path
    model_path: Path
    parity_path: Path
    spec: ModelSpec
    parity: dict[str, Any]
    int8_path: Path | None = None
    rejected_int8_path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def int8_gate(self) -> dict[str, Any] | None:
        """parity.json's ``int8`` section: the INT8 recipe and accuracy gate record."""
        return self.parity.get("int8")
