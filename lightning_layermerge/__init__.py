"""lightning_layermerge: LayerMerge (ICML 2024) depth compression for PyTorch Lightning.

Surgery (torch only): :func:`trace`, :func:`prune`, :func:`merge`, :class:`Plan`.
Planning (no Lightning): :func:`solve`.
"""

from .graph import Chain, Layer, Position, Segment, Skip, trace
from .merge import merge
from .plan import Plan
from .prune import prune
from .solve import Solution, solve

__all__ = [
    "Chain", "Distillation", "Layer", "LayerMergeCallback", "Plan", "Position", "Segment", "Skip", "Solution",
    "merge", "prune", "solve", "trace",
]


def __getattr__(name: str):
    """Import the Lightning layer lazily: the surgery and planning layers need no Lightning."""
    if name == "LayerMergeCallback":
        from .callback import LayerMergeCallback

        return LayerMergeCallback
    if name == "Distillation":
        from .distill import Distillation

        return Distillation
    raise AttributeError(f"module 'lightning_layermerge' has no attribute {name!r}")
__version__ = "0.1.0"
