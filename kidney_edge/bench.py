"""Alias of :func:`kidney_edge.runtime.run_benchmark` for ``kidney_edge.demo``, which still
imports it from here; the benchmark lives in :mod:`kidney_edge.runtime.benchmark`."""

from kidney_edge.runtime.benchmark import run_benchmark

__all__ = ["run_benchmark"]
