"""``trace``: read a real network as the paper's chain of convolutions.

:func:`trace` captures the network with torch.fx (:mod:`~lightning_layermerge.surgery.capture`),
finds its chain (:mod:`~lightning_layermerge.surgery.analysis`) and returns the public data
(:mod:`~lightning_layermerge.surgery.chain`, re-exported here). Nothing here is
architecture-specific; model-family knowledge lives in ``surgery.adapters``.
"""

from __future__ import annotations

import torch
from torch import nn

from .analysis import ChainAnalysis
from .capture import ExampleInput, as_args, capture
from .chain import Chain, Layer, Position, Segment, Skip

__all__ = ["Chain", "Layer", "Position", "Segment", "Skip", "trace"]


def trace(model: nn.Module, example_input: ExampleInput, *, max_kernel: int | None = None) -> Chain:
    """Capture ``model`` on ``example_input`` and read it as a chain of convolutions.

    Args:
        model: any ``nn.Module``; a deep copy is traced, the model itself is not modified.
        example_input: a tensor (the single positional argument) or a tuple of positional
            arguments. Shapes are taken from a real forward pass on it.
        max_kernel: optionally drop segments whose merged kernel exceeds this size.

    Returns:
        The :class:`Chain`, with layers, positions, skips and every legal segment.

    Raises:
        ValueError: the model has no convolution, cannot be traced, or does not accept the
            example input.
    """
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()) if isinstance(model, nn.Module) else False:
        raise ValueError(
            f"{type(model).__name__} has no nn.Conv2d layer: LayerMerge compresses convolutional "
            "networks. Pass the model (or submodule) that holds the convolutions."
        )
    cap = capture(model, example_input)
    analysis = ChainAnalysis(cap, type(model).__name__)
    segments = list(analysis.all_segments(max_kernel))
    inputs = tuple(cap.shapes[n.name] for n in cap.gm.graph.nodes if n.op == "placeholder" and n.name in cap.shapes)
    example = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in as_args(example_input))
    chain = Chain(analysis.layers, analysis.positions, analysis.skips, segments, type(model).__name__,
                  inputs, cap, example)
    chain._analysis = analysis
    return chain

