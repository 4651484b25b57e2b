"""Backbone facts the configs and the CLI need without torch: the built-in architecture names,
how each reads its input (:class:`ArchView`) and the "whole backbone" block count.

:mod:`kidney_edge.backbones` registers its models under these names (it imports torch);
``kidney-edge train --arch`` offers them as choices and :class:`~kidney_edge.training.TrainConfig`
defaults to the first, so neither has to import torch to know them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kidney_edge.spec import ResizeRule

EFFICIENTNET_LITE0 = "efficientnet_lite0"
EFFICIENTNET_B0 = "efficientnet_b0"
# Lite0 reading its view as two mirrored halves, one kidney each (backbones.KidneyPairNet).
EFFICIENTNET_LITE0_PAIR = "efficientnet_lite0_pair"
# The built-in backbones, the default first; tests/test_backbones.py checks the registry agrees.
ARCHS = (EFFICIENTNET_LITE0_PAIR, EFFICIENTNET_LITE0, EFFICIENTNET_B0)
ALL_BLOCKS = -1  # unfreeze the whole backbone, stem included (CLI: --unfreeze-blocks all)
# Each view the backbone reads is 224 px, the size its ImageNet weights saw.
DEFAULT_INPUT_SIZE = 224


@dataclass(frozen=True)
class ArchView:
    """How an arch reads its input: the side it trains at unless --image-size says otherwise,
    and the spec's resize rule that fills it (the arch decides it, not the user)."""

    input_size: int = DEFAULT_INPUT_SIZE
    resize: ResizeRule = ResizeRule.LETTERBOX


# The pair reads two halves of its input, each squared to half its side: at 448 px each kidney
# is seen at 224. The kidney band is about 2.2 times as wide as tall, so it is stretched onto
# the square input: letterboxed, more than half of each half would be black.
ARCH_VIEWS = {EFFICIENTNET_LITE0_PAIR: ArchView(448, ResizeRule.STRETCH)}


def arch_view(arch: str) -> ArchView:
    """How ``arch`` reads its input; an arch not in :data:`ARCH_VIEWS` reads one letterboxed
    view at :data:`DEFAULT_INPUT_SIZE`."""
    return ARCH_VIEWS.get(arch, ArchView())


def input_size(arch: str) -> int:
    """The input side ``arch`` trains at by default."""
    return arch_view(arch).input_size
