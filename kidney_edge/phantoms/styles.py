"""What ``kidney-edge synth`` can draw: the renderers of the Kaggle layout (``--style``) and the
output formats (``--format``), each with the defaults the CLI shows."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum

from kidney_edge.errors import InputError
from kidney_edge.phantoms import classic, lookalike
from kidney_edge.phantoms.kaggle_layout import PhantomSummary


class PhantomStyle(str, Enum):
    """Which renderer ``kidney-edge synth --style`` uses."""

    classic = "classic"  # kidney_edge.phantoms.classic: the tuned demo and test data
    lookalike = "lookalike"  # kidney_edge.phantoms.lookalike: independent anatomy, for checking defaults
    lookalike_one_scanner = "lookalike-one-scanner"  # the same patients, all imaged alike


class PhantomFormat(str, Enum):
    """What ``kidney-edge synth`` writes (``--format``)."""

    KAGGLE = "kaggle"  # class folders of JPEG slices, the Kaggle dataset's layout
    DICOM = "dicom"  # PACS-style DICOM series, one study per patient (kidney_edge.phantoms.dicom_series)


Synthesizer = Callable[..., PhantomSummary]
_SYNTHESIZERS: dict[PhantomStyle, Synthesizer] = {
    PhantomStyle.classic: classic.synthesize,
    PhantomStyle.lookalike: lookalike.synthesize,
    PhantomStyle.lookalike_one_scanner: functools.partial(lookalike.synthesize, one_scanner=True),
}
# What each style draws when --slices-per-patient is not given.
STYLE_SLICES_PER_PATIENT = {
    PhantomStyle.classic: classic.SLICES_PER_PATIENT,
    PhantomStyle.lookalike: lookalike.SLICES_PER_PATIENT,
    PhantomStyle.lookalike_one_scanner: lookalike.SLICES_PER_PATIENT,
}


def synthesizer(style: PhantomStyle | str) -> Synthesizer:
    """The ``synthesize`` function of a style; all take the same keyword arguments."""
    try:
        chosen = PhantomStyle(style)
    except ValueError:
        valid = ", ".join(s.value for s in PhantomStyle)
        raise InputError(f"--style must be one of {valid} (got {style!r})") from None
    return _SYNTHESIZERS[chosen]
