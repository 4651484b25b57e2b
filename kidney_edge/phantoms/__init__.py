"""Phantom data, drawn offline with numpy and Pillow, standing in for data that cannot be downloaded.

- :mod:`~kidney_edge.phantoms.kaggle_layout`: the Kaggle dataset's layout (file and column names)
  and :func:`~kidney_edge.phantoms.kaggle_layout.write_phantom`, the one writer of it: planning
  of patients and byte copies, files, ``kidneyData.csv`` and ``phantom_truth.csv``;
- :mod:`~kidney_edge.phantoms.classic`: the tuned renderer of the demo and tests;
- :mod:`~kidney_edge.phantoms.lookalike`: an independent renderer, to check training defaults;
- :mod:`~kidney_edge.phantoms.dicom_series`: classic patients as PACS-style DICOM CT series;
- :mod:`~kidney_edge.phantoms.foreign`: inputs that are not kidney CT, for "unknown" detection;
- :mod:`~kidney_edge.phantoms.styles`: the ``--style`` and ``--format`` choices of ``synth``.

Import from the modules: this file imports none of them, so that :mod:`kidney_edge.dataset` can
take the layout's names without loading a renderer.
"""
