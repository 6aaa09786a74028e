"""Surgery (torch only): find a network's conv chain, prune it to a plan, merge what remains.

:func:`trace` captures a network with torch.fx and returns its :class:`Chain`;
:func:`prune` keeps the layers a :class:`Plan` keeps (identity for the rest);
:func:`merge` folds each kept run into one conv; :func:`fold_batchnorm` is the original with
only its BatchNorms folded (the latency reference) and :func:`rebuild_compressed` the network a
stored plan describes; :func:`save_compressed` /
:func:`load_compressed` store the result without pickled code; :mod:`.testing` checks that a
surgery kept the function (BatchNorm statistics, relative error). Nothing here imports
Lightning or the planning layer.
"""

from .graph import Chain, Layer, Position, Segment, Skip, trace
from .merge import merge
from .meta import SurgeryMeta
from .plan import Plan
from .prune import prune
from .rebuild import fold_batchnorm, rebuild_compressed
from .serialization import export_onnx, export_torchscript, load_compressed, save_compressed

__all__ = [
    "Chain", "Layer", "Plan", "Position", "Segment", "Skip", "SurgeryMeta", "export_onnx", "export_torchscript",
    "fold_batchnorm", "load_compressed", "merge", "prune", "rebuild_compressed", "save_compressed", "trace",
]
