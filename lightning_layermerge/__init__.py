"""lightning_layermerge: LayerMerge (ICML 2024) depth compression for PyTorch Lightning.

Surgery (torch only): :func:`trace`, :func:`prune`, :func:`merge`, :class:`Plan`;
saving and export: :func:`save_compressed`, :func:`load_compressed`, :func:`export_torchscript`,
:func:`export_onnx`.
Planning (no Lightning): :func:`build_latency_table`, :func:`build_importance_table`,
:func:`solve`, :class:`LatencySettings`, :class:`LayerMergeReport`.
Lightning (imported on first use): :class:`LayerMergeCallback`, :class:`Distillation`,
:class:`ImportanceSettings`, :func:`restore_pruned`, :func:`rebuild_pruned`.
"""

from .graph import Chain, Layer, Position, Segment, Skip, trace
from .merge import merge
from .plan import Plan
from .prune import prune
from .report import LayerMergeReport
from .serialization import export_onnx, export_torchscript, load_compressed, save_compressed
from .solve import Solution, solve
from .tables.importance import build_importance_table
from .tables.latency import LatencySettings, LatencyTable, build_latency_table

__all__ = [
    "Chain", "Distillation", "ImportanceSettings", "LatencySettings", "LatencyTable", "Layer", "LayerMergeCallback",
    "LayerMergeReport", "Plan", "Position", "Segment", "Skip", "Solution", "build_importance_table",
    "build_latency_table", "export_onnx", "export_torchscript", "load_compressed", "merge", "prune",
    "rebuild_pruned", "restore_pruned", "save_compressed", "solve", "trace",
]

# Names of the Lightning layer, by the module that defines them.
_LAZY = {"LayerMergeCallback": "callback", "restore_pruned": "resume", "rebuild_pruned": "resume",
         "Distillation": "distill",
         "ImportanceSettings": "subruns"}


def __getattr__(name: str):
    """Import the Lightning layer lazily: the surgery and planning layers need no Lightning."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lightning_layermerge' has no attribute {name!r}")
__version__ = "0.1.0"
