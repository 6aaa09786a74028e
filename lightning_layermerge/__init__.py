"""lightning_layermerge: LayerMerge (ICML 2024) depth compression for PyTorch Lightning.

Surgery (torch only): :func:`trace`, :func:`prune`, :func:`merge`, :class:`Plan`.
Planning (no Lightning): :func:`solve`.
"""

from .graph import Chain, Layer, Position, Segment, Skip, trace
from .merge import merge
from .plan import Plan
from .prune import prune
from .solve import Solution, solve

__all__ = ["Chain", "Layer", "Plan", "Position", "Segment", "Skip", "Solution", "merge", "prune", "solve", "trace"]
__version__ = "0.1.0"
