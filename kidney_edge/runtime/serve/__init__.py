"""``kidney-edge serve``: a local inference service and web page for one exported model.

- :mod:`~kidney_edge.runtime.serve.config`: :class:`ServeConfig` (options, bind-address rule).
- :mod:`~kidney_edge.runtime.serve.limits`: request limits and the errors that carry HTTP statuses.
- :mod:`~kidney_edge.runtime.serve.batcher`: dynamic batching of concurrent requests.
- :mod:`~kidney_edge.runtime.serve.service`: decode -> batch -> ``classify`` -> the answer (its
  activation-map overlays come from :mod:`kidney_edge.runtime.cam`, shared with ``predict --report``).
- :mod:`~kidney_edge.runtime.serve.metrics`: Prometheus text.
- :mod:`~kidney_edge.runtime.serve.app`: the FastAPI app and uvicorn (the ``serve`` extra).

No web framework is imported until :func:`create_app` or :func:`serve` runs.
"""

from __future__ import annotations

from kidney_edge.runtime.serve.app import create_app, serve
from kidney_edge.runtime.serve.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServeConfig,
    exposure_warning,
    is_loopback,
)
from kidney_edge.runtime.serve.service import InferenceService

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "InferenceService",
    "ServeConfig",
    "create_app",
    "exposure_warning",
    "is_loopback",
    "serve",
]
