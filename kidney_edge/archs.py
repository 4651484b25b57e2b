"""Backbone facts the configs and the CLI need without torch: the built-in architecture names
and the "whole backbone" block count.

:mod:`kidney_edge.backbones` registers its models under these names (it imports torch);
``kidney-edge train --arch`` offers them as choices and :class:`~kidney_edge.training.TrainConfig`
defaults to the first, so neither has to import torch to know them.
"""

from __future__ import annotations

EFFICIENTNET_LITE0 = "efficientnet_lite0"
EFFICIENTNET_B0 = "efficientnet_b0"
# Lite0 reading its view as two mirrored halves, one kidney each (backbones.KidneyPairNet).
EFFICIENTNET_LITE0_PAIR = "efficientnet_lite0_pair"
# The built-in backbones, the default first; tests/test_backbones.py checks the registry agrees.
ARCHS = (EFFICIENTNET_LITE0_PAIR, EFFICIENTNET_LITE0, EFFICIENTNET_B0)
ALL_BLOCKS = -1  # unfreeze the whole backbone, stem included (CLI: --unfreeze-blocks all)
# The input side (px) an arch trains at unless --image-size says otherwise: each view the backbone
# reads at the 224 px its ImageNet weights saw. The pair reads two halves of its input, squared.
DEFAULT_INPUT_SIZE = 224
INPUT_SIZES = {EFFICIENTNET_LITE0_PAIR: 448}


def input_size(arch: str) -> int:
    """The input side ``arch`` trains at by default."""
    return INPUT_SIZES.get(arch, DEFAULT_INPUT_SIZE)
