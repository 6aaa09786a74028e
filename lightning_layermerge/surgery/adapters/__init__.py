"""Adapters: the small amount of model-family knowledge the core needs, kept out of it.

An adapter can
- mark a module class as a *leaf* (captured as one node instead of being traced through),
- register a leaf class as identity-in-eval or as an element-wise activation,
- register a *decomposition*: a composite leaf (e.g. timm's ``BatchNormAct2d``) replaced,
  after tracing, by a sequence of plain modules that the core understands,
- register a traceable *forward* for a module class whose own forward fx cannot trace
  (e.g. diffusers' ``UNet2DModel``); it must compute the same function, which ``capture``
  checks on the example input,
- register a *portable* stand-in for a leaf class: an equivalent module of
  ``lightning_layermerge.modules`` (same children and parameters) that ``save_compressed``
  stores instead, so the saved network names only allow-listed classes;
- register a *wrapper*: how a compressed network is handed back in its library's own model
  type (e.g. a diffusers model that pipelines and ``save_pretrained`` accept).
A family that needs none of this needs no adapter at all.
"""

from __future__ import annotations

import types
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
_FORWARDS: list[tuple[Predicate, Callable]] = []
_PORTABLE: list[tuple[Predicate, Callable[[nn.Module], nn.Module]]] = []
_WRAPPERS: list[tuple[Predicate, Callable[[nn.Module, fx.GraphModule], nn.Module]]] = []


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


def register_forward(applies: Predicate, forward: Callable) -> None:
    """Trace ``forward(module, *args, **kwargs)`` instead of the forward of matching modules.

    Used only on the deep copy that ``capture`` traces; the graph it yields must compute
    what the module computes (``capture`` compares them on the example input).
    """
    _FORWARDS.append((applies, forward))


def register_portable(applies: Predicate, convert: Callable[[nn.Module], nn.Module]) -> None:
    """Save matching leaves as ``convert(module)``: an equivalent module of this package that
    shares the leaf's children and parameters (``convert`` raises ValueError for a
    configuration it cannot represent)."""
    _PORTABLE.append((applies, convert))


def portable(module: nn.Module) -> nn.Module | None:
    """The registered stand-in for ``module`` (see :func:`register_portable`), or ``None``.

    The stand-in gets ``module``'s train/eval flag (set on it alone: shared children keep theirs).
    """
    convert = next((c for applies, c in _PORTABLE if applies(module)), None)
    if convert is None:
        return None
    stand_in = convert(module)
    stand_in.training = module.training
    return stand_in


def install_forwards(model: nn.Module) -> list[str]:
    """Bind registered traceable forwards on ``model`` (a throwaway copy) and its submodules.

    fx traces the root through ``type(root).forward``, so the root gets a one-off subclass;
    submodules are called through ``Module.__call__`` and get an instance attribute.

    Returns:
        Qualified names of the modules whose forward was replaced ("" for the root).
    """
    replaced = []
    for name, module in list(model.named_modules()):
        forward = next((f for applies, f in _FORWARDS if applies(module)), None)
        if forward is None or is_leaf(module):
            continue
        if module is model:
            cls = type(model)
            model.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
        else:
            module.forward = types.MethodType(forward, module)
        replaced.append(name)
    return replaced


def register_wrapper(applies: Predicate, wrap: Callable[[nn.Module, fx.GraphModule], nn.Module]) -> None:
    """Hand compressed networks of originals matching ``applies`` back as ``wrap(original, network)``."""
    _WRAPPERS.append((applies, wrap))


def wrap_compressed(original: nn.Module, network: nn.Module) -> nn.Module:
    """``network`` (from ``prune``/``merge`` of ``original``) in the original's library type, if an
    adapter registered one (a diffusers ``UNet2DModel`` -> ``LayerMergeUNet2DModel``); else ``network``.

    The wrapper must call like ``network``, hold it as ``.network`` and own no other
    parameters (it is used in its place; :func:`unwrap_compressed` takes it out again).
    """
    if not isinstance(network, fx.GraphModule):
        return network
    wrap = next((w for applies, w in _WRAPPERS if applies(original)), None)
    return network if wrap is None else wrap(original, network)


def unwrap_compressed(module: nn.Module) -> nn.Module:
    """The network inside a wrapper made by :func:`wrap_compressed` (its ``.network``); else ``module``."""
    from ..meta import SurgeryMeta  # not at import time: meta imports capture, which imports this package

    inner = getattr(module, "network", None)
    if not isinstance(module, fx.GraphModule) and SurgeryMeta.present(inner):
        return inner
    return module


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


from . import diffusers as _diffusers  # noqa: E402,F401  (registers diffusers' modules)
from . import timm as _timm  # noqa: E402,F401  (registers timm's modules)
