"""Benchmarks of fastbn: the registry, the roofline arithmetic and the ``bench`` report.

``python -m fastbn bench --help`` runs the report; ``pytest bench/ --benchmark-only`` runs the
pytest-benchmark suite over the same registry.
"""

from .registry import CASES, IMPLEMENTATIONS, REGISTRY, Case, Inputs, make_inputs
from .roofline import (PASS_STREAMS, PASSES, Bandwidth, bytes_moved, gb_per_s,
                       measure_bandwidth, roofline_percent)

__all__ = [
    "CASES", "IMPLEMENTATIONS", "REGISTRY", "Case", "Inputs", "make_inputs",
    "PASS_STREAMS", "PASSES", "Bandwidth", "bytes_moved", "gb_per_s", "measure_bandwidth",
    "roofline_percent",
]
