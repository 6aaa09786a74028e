"""Graph capture: a model and an example input in, a normalised fx graph with shapes out.

The capture is done on a deep copy in eval mode, so the caller's model is never touched.
Code paths that depend on ``self.training`` outside leaf modules are frozen to their eval
branch; leaf modules (convs, norms, dropout, activations, registered adapter modules) keep
following ``.train()``/``.eval()`` in the captured graph, so it stays trainable.

Where an adapter supplies a traceable forward for a module fx cannot trace (diffusers'
``UNet2DModel``), the captured graph is compared with the model's own output on the
example input, and refused if they differ.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from . import adapters

ExampleInput = torch.Tensor | Sequence[Any]


@dataclass
class Capture:
    """A traced, normalised copy of a model.

    Attributes:
        gm: the GraphModule (owns deep copies of the model's modules).
        shapes: output shape of every tensor-valued node, by node name, from a real forward.
    """

    gm: fx.GraphModule
    shapes: dict[str, tuple[int, ...]]

    def modules(self) -> dict[str, nn.Module]:
        """Submodules of the graph module by qualified name."""
        return dict(self.gm.named_modules())


class _Tracer(fx.Tracer):
    """fx tracer that remembers which submodule it is in, to explain failures."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return adapters.is_leaf(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(m)
        self.stack.append(f"{name or '<root>'} ({type(m).__name__})")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module is the first to see the error
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def as_args(example_input: ExampleInput) -> tuple[Any, ...]:
    """A tensor is the single positional argument; a tuple or list is all of them."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError(
        f"example_input must be a tensor or a tuple of positional arguments, got {type(example_input).__name__}"
    )


def capture(model: nn.Module, example_input: ExampleInput,
            shapes: dict[str, tuple[int, ...]] | None = None) -> Capture:
    """Trace a deep copy of ``model`` with torch.fx and record every node's output shape.

    ``shapes`` from an earlier capture of the same architecture skips the forward pass
    (``prune`` re-captures a model it has already traced).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if the model cannot be traced (names the failing submodule) or the
            example input does not fit the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = as_args(example_input)
    work = copy.deepcopy(model).eval()
    replaced = adapters.install_forwards(work)
    gm = _trace(work)
    adapters.normalise(gm)
    _out_of_place(gm)
    if shapes is None:
        shapes = _shapes(gm, args, model)
        if replaced:
            _check_adapter_forwards(gm, args, model, replaced)
    elif any(n.name not in shapes for n in gm.graph.nodes if n.op in ("call_module", "call_function")):
        shapes = _shapes(gm, args, model)  # a different graph: measure rather than guess
    return Capture(gm, dict(shapes))


def _check_adapter_forwards(gm: fx.GraphModule, args: tuple[Any, ...], model: nn.Module,
                            replaced: list[str]) -> None:
    """The graph traced through adapter forwards must compute what the model computes.

    An adapter forward restates a library's forward in traceable form; if the installed
    library computes something else (another version), refuse rather than mis-capture.
    """
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        want, got = _tensors(reference(*args)), _tensors(gm(*args))
    same = len(want) == len(got) and all(
        w.shape == g.shape and torch.allclose(w, g, rtol=1e-4, atol=1e-5 * float(w.abs().max().clamp(min=1)))
        for w, g in zip(want, got)
    )
    if not same:
        where = ", ".join(n or "<root>" for n in replaced)
        raise ValueError(
            f"the adapter forward(s) for {type(model).__name__} ({where}) do not reproduce its output on the "
            "example input; the installed library version probably differs from the one the adapter restates"
        )


def _tensors(out: Any) -> list[torch.Tensor]:
    """Tensors of a (nested) model output: tensor, tuple/list, dict or dataclass-like dict."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types; all mean "not traceable"
        where = tracer.failed_in or f"<root> ({type(model).__name__})"
        raise ValueError(
            f"torch.fx could not trace {type(model).__name__}: failed inside submodule {where}"
            f"{_model_line(err)}: {type(err).__name__}: {str(err).strip()}. "
            "Data-dependent control flow cannot be captured; trace a submodule that contains the convolutions "
            "instead (e.g. `model.features`), or register an adapter for this module type."
        ) from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _model_line(err: BaseException) -> str:
    """`` at file.py:line (`code`)``: the innermost frame of model code (outside torch) that
    raised, i.e. the operation fx could not trace; "" if there is none."""
    torch_dir = Path(torch.__file__).parent
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not Path(f.filename).is_relative_to(torch_dir)
              and Path(f.filename) != Path(__file__)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {Path(f.filename).name}:{f.lineno}" + (f" (`{f.line.strip()}`)" if f.line else "")


def _out_of_place(gm: fx.GraphModule) -> None:
    """Make in-place operations out-of-place wherever that cannot change the result.

    ``ReLU(inplace=True)`` after a BatchNorm overwrites a tensor nobody else reads. Once
    ``prune`` bypasses the conv and norm before it, the same ReLU would overwrite the block
    input that the residual shortcut still reads. An in-place op whose input has no other
    reader after it computes the same as its out-of-place form, so those are converted here,
    before any rewriting; the rare in-place op whose side effect is observed is left alone.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def harmless(node: fx.Node) -> bool:
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return False
        return all(u is node or order[u] < order[node] for u in source.users)

    module_sites: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module_sites.setdefault(str(node.target), []).append(node)
        elif node.op == "call_function" and node.kwargs.get("inplace") is True and harmless(node):
            node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_function" and node.target in _INPLACE_FUNCTIONS and harmless(node):
            node.target = _INPLACE_FUNCTIONS[node.target]
        elif node.op == "call_method" and node.target in _INPLACE_METHODS and harmless(node):
            node.target = str(node.target)[:-1]
    for target, sites in module_sites.items():
        module = gm.get_submodule(target)
        if getattr(module, "inplace", None) is True and all(harmless(n) for n in sites):
            module.inplace = False
    gm.recompile()


_INPLACE_FUNCTIONS = {torch.relu_: torch.relu, nn.functional.relu_: nn.functional.relu}
_INPLACE_METHODS = frozenset({"relu_", "sigmoid_", "tanh_", "clamp_", "add_", "mul_", "hardtanh_"})


def _shapes(gm: fx.GraphModule, args: tuple[Any, ...], model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Run the graph once, recording the shape of every tensor a node produces."""
    shapes: dict[str, tuple[int, ...]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    try:
        with torch.no_grad():
            _Recorder(gm).run(*args)
    except Exception as err:
        got = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        hint = f" (its first conv expects {first.in_channels} input channels)" if first is not None else ""
        raise ValueError(
            f"the example input [{got}] does not fit {type(model).__name__}{hint}: "
            f"{type(err).__name__}: {str(err).splitlines()[0]}. Pass an input the model accepts, e.g. a batch "
            "shaped like your training data (N, C, H, W)."
        ) from err
    return shapes
