"""lightning_layermerge: LayerMerge (ICML 2024) depth compression for PyTorch Lightning.

Surgery (torch only): :func:`trace`, :func:`prune`, :func:`merge`, :class:`Plan`,
:func:`fold_batchnorm` (the original with BatchNorm folded: the latency reference);
saving and export: :func:`save_compressed`, :func:`load_compressed`, :func:`export_torchscript`,
:func:`export_onnx`.
Planning (no Lightning): :func:`build_latency_table`, :func:`build_importance_table`,
:func:`solve`, :class:`LatencySettings`, :class:`LayerMergeReport`.
Lightning (imported on first use): :class:`LayerMergeCallback`, :class:`Distillation`,
:class:`ImportanceSettings`, :func:`restore_pruned`, :func:`rebuild_pruned`.
diffusers (imported on first use): :class:`LayerMergeUNet2DModel` (a compressed UNet2DModel
as a diffusers model: pipelines, ``save_pretrained`` / ``from_pretrained``).
"""

from . import _moved
from .planning.report import LayerMergeReport
from .planning.solve import Solution, solve
from .planning.tables.importance import build_importance_table
from .planning.tables.latency import LatencySettings, LatencyTable, build_latency_table
from .surgery.graph import Chain, Layer, Position, Segment, Skip, trace
from .surgery.merge import merge
from .surgery.plan import Plan
from .surgery.prune import prune
from .surgery.rebuild import fold_batchnorm
from .surgery.serialization import export_onnx, export_torchscript, load_compressed, save_compressed

_moved.install()

__all__ = [
    "Chain", "Distillation", "ImportanceSettings", "LatencySettings", "LatencyTable", "Layer", "LayerMergeCallback",
    "LayerMergeReport", "LayerMergeUNet2DModel", "Plan", "Position", "Segment", "Skip", "Solution", "build_importance_table",
    "build_latency_table", "export_onnx", "export_torchscript", "fold_batchnorm", "load_compressed", "merge", "prune",
    "rebuild_pruned", "restore_pruned", "save_compressed", "solve", "trace",
]

# Names of the Lightning layer (and of the diffusers model), by the module that defines them.
_LAZY = {"LayerMergeCallback": "fit.callback", "restore_pruned": "fit.resume", "rebuild_pruned": "fit.resume",
         "Distillation": "fit.distill", "ImportanceSettings": "fit.importance_settings",
         "LayerMergeUNet2DModel": "adapters.diffusers_model"}


def __getattr__(name: str):
    """Import the Lightning layer (and diffusers) lazily: the surgery and planning layers need neither.
    An old module path (``lightning_layermerge.tables``) is the module it moved to."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    module = _moved.moved_module(name)
    if module is not None:
        return module
    raise AttributeError(f"module 'lightning_layermerge' has no attribute {name!r}")
__version__ = "0.1.0"
