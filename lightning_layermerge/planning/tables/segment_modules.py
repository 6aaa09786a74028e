"""The module a latency table times for a segment: what ``merge`` produces for it (torch only)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from ...surgery.graph import Chain, Segment

__all__ = ["segment_module"]


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
