"""Adapters: the small amount of model-family knowledge the core needs, kept out of it.

An adapter can
- mark a module class as a *leaf* (captured as one node instead of being traced through),
- register a leaf class as identity-in-eval or as an element-wise activation,
- register a *decomposition*: a composite leaf (e.g. timm's ``BatchNormAct2d``) replaced,
  after tracing, by a sequence of plain modules that the core understands.
A family that needs none of this needs no adapter at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx, nn

from .. import ops

Predicate = Callable[[nn.Module], bool]
Decomposer = Callable[[nn.Module], list[tuple[str, nn.Module]]]


@dataclass(frozen=True)
class _Decomposition:
    applies: Predicate
    parts: Decomposer


_LEAVES: list[Predicate] = []
_DECOMPOSITIONS: list[_Decomposition] = []


def register_leaf(applies: Predicate) -> None:
    """Capture modules for which ``applies(module)`` is true as single graph nodes."""
    _LEAVES.append(applies)


def register_identity(applies: Predicate) -> None:
    """Capture matching modules as leaves that are identity in eval mode (stochastic depth)."""
    register_leaf(applies)
    ops.IDENTITY_PREDICATES.append(applies)


def register_activation(applies: Predicate) -> None:
    """Capture matching modules as leaves that are element-wise activations."""
    register_leaf(applies)
    ops.ACTIVATION_PREDICATES.append(applies)


def register_decomposition(applies: Predicate, parts: Decomposer) -> None:
    """Replace every captured leaf for which ``applies`` holds by ``parts(module)``.

    ``parts`` returns ``(suffix, module)`` pairs applied in order; suffix "" reuses the
    leaf's own attribute name (so its state-dict keys are unchanged), other suffixes are
    appended to it (``bn1`` -> ``bn1_act``).
    """
    register_leaf(applies)
    _DECOMPOSITIONS.append(_Decomposition(applies, parts))


def is_leaf(module: nn.Module) -> bool:
    """Whether an adapter wants ``module`` captured as one node."""
    return any(applies(module) for applies in _LEAVES)


def normalise(gm: fx.GraphModule) -> None:
    """Apply registered decompositions to ``gm`` in place."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        spec = next((d for d in _DECOMPOSITIONS if d.applies(module)), None)
        if spec is not None:
            _decompose(gm, node, spec.parts(module))
    gm.graph.lint()
    gm.recompile()


def _decompose(gm: fx.GraphModule, node: fx.Node, parts: list[tuple[str, nn.Module]]) -> None:
    target = str(node.target)
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    current, anchor = node.args[0], node
    for suffix, module in parts:
        name = leaf + suffix
        setattr(parent, name, module)
        qual = f"{parent_name}.{name}" if parent_name else name
        with gm.graph.inserting_after(anchor):
            current = anchor = gm.graph.call_module(qual, (current,))
    node.replace_all_uses_with(current)
    gm.graph.erase_node(node)


from . import timm as _timm  # noqa: E402,F401  (registers timm's modules)
