"""What a latency table times (torch only): a segment's module, i.e. what ``merge`` produces for it, the
BN-folded whole network, and their inputs at the timing batch size."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from ...surgery.graph import Chain, Segment
from ...surgery.rebuild import fold_batchnorm
from .latency_settings import LatencySettings
from .latency_store import _batched

__all__ = ["batched_example", "segment_module"]


class _FunctionActivation(nn.Module):
    """A functional activation (``F.relu(x)``, ``torch.sigmoid(x)``) as a module."""

    def __init__(self, fn: Any, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args, **self.kwargs)


class _MethodActivation(nn.Module):
    """A tensor-method activation (``x.relu()``) as a module."""

    def __init__(self, name: str, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.name, self.args, self.kwargs = name, args, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(x, self.name)(*self.args, **self.kwargs)


def _activation_module(chain: Chain, position: int) -> nn.Module | None:
    """Deep copy of the activation at ``position`` of the captured graph (None if none)."""
    name = chain.positions[position].activation
    if name is None:
        return None
    gm = chain.capture.gm
    node = next(n for n in gm.graph.nodes if n.name == name)
    extra = node.args[1:]
    if any(isinstance(a, fx.Node) for a in extra) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        raise ValueError(f"activation {name} reads another tensor; it cannot be timed on its own")
    if node.op == "call_module":
        return copy.deepcopy(gm.get_submodule(str(node.target)))
    if node.op == "call_function":
        return _FunctionActivation(node.target, tuple(extra), dict(node.kwargs))
    if node.op == "call_method":
        return _MethodActivation(str(node.target), tuple(extra), dict(node.kwargs))
    raise ValueError(f"activation {name} is a {node.op} node, not a module, function or method call")


def segment_module(chain: Chain, seg: Segment) -> nn.Sequential:
    """The module ``merge`` produces for ``seg``, with random weights, for timing.

    Args:
        chain: The chain ``seg`` belongs to.
        seg: A legal segment of ``chain``.

    Returns:
        ``nn.Sequential(conv, activation)``: ``nn.Conv2d(in, out, seg.kernel, stride, padding,
        groups, bias=True)`` of the merged geometry (``seg.kernel`` is ``k`` less the taps that
        ``merge`` trims because they only read zero padding) (absent for an identity segment), followed by a
        deep copy of the activation ending the segment at position ``seg.j`` (absent if the
        position has none; functional activations are wrapped in a module).
    """
    layers: list[nn.Module] = []
    if not seg.identity:
        # seg.kernel, not seg.k: merge trims taps that can only ever read zero padding.
        layers.append(nn.Conv2d(seg.in_shape[1], seg.out_shape[1], seg.kernel, stride=seg.stride,
                                padding=seg.padding, groups=seg.groups, bias=True))
    act = _activation_module(chain, seg.j)
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


def _example_batch(chain: Chain) -> int:
    """Batch size of the chain's example input (first dim of its first tensor argument)."""
    for arg in chain.example:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0:
            return int(arg.shape[0])
    return int(chain.layers[0].in_shape[0])


def batched_example(chain: Chain, batch: int | None) -> tuple:
    """``chain.example`` with every batch-sized tensor resized to ``batch`` along dim 0.

    Real example data is reused (cycled when the batch grows), so integer arguments such
    as diffusion timesteps stay valid.
    """
    if batch is None:
        return tuple(chain.example)
    n = _example_batch(chain)
    out = []
    for arg in chain.example:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] == n:
            arg = arg.index_select(0, torch.arange(batch, device=arg.device) % n)
        out.append(arg)
    return tuple(out)


def _segment_run(chain: Chain, seg: Segment, settings: LatencySettings) -> tuple[nn.Module, tuple]:
    """The merged module of one segment and a random input of its shape."""
    return segment_module(chain, seg), (torch.randn(_batched(seg.in_shape, settings.batch_size)),)


def _whole_run(model: nn.Module, chain: Chain, settings: LatencySettings) -> tuple[nn.Module, tuple]:
    """The original model with BatchNorm folded (the keep-all plan, merged) and its input."""
    return fold_batchnorm(model, chain), batched_example(chain, settings.batch_size)


def _geometry(seg: Segment) -> tuple:
    """What a segment's timed module depends on: equal geometries are timed once."""
    return (tuple(seg.in_shape[1:]), seg.out_shape[1], seg.kernel, seg.stride, seg.padding, seg.groups,
            seg.activation, seg.identity)
