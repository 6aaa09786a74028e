"""A ``torch.fx.GraphModule`` as plain data, rebuilt without running anything from the data.

:func:`to_data` turns a compressed network into a JSON-able description plus a dict of
tensors; :func:`from_data` rebuilds it. The description holds

* the graph: one entry per node with its ``op``, its name, its ``target`` and its
  ``args``/``kwargs`` as plain data (numbers, strings, lists, tagged tuples, slices, dtypes,
  devices and references to earlier nodes);
* the modules: for each module its class *name*, its plain attributes (what a constructor
  stored: channels, kernel size, eps, ...), the keys of its parameters and buffers among
  the tensors, and its children.

Why loading runs nothing from the file: every name in the description is looked up in a
table written in this package (:mod:`~lightning_layermerge.surgery.allowlists`), never imported. Functions (``call_function``) must be in
:data:`FUNCTIONS` (arithmetic operators, selected ``torch`` and ``torch.nn.functional``
functions, three functions of this package); methods (``call_method``) in :data:`METHODS`
(tensor methods); attributes read with ``getattr`` in :data:`ATTRIBUTES`; module classes
in :data:`MODULE_CLASSES` (``torch.nn`` modules and this package's ``modules``). A module is
created with ``cls.__new__`` and ``nn.Module.__init__`` (no constructor runs), and only plain
values are assigned to it; so a file can make torch's own code compute, but adds no code.
Anything else is refused with an error that names it. Names that ``torch.fx`` writes into
the Python code it generates for the graph are checked: node names must be identifiers,
module paths letters, digits, ``_`` and ``-`` (no dunders); values reach that code only as
``repr`` of plain data. The tensors come from a safetensors file, which holds raw numbers only.
"""

from __future__ import annotations

import inspect
import keyword
from typing import Any

import torch
from torch import fx, nn

from . import adapters, modules as portable_modules
from .allowlists import (ATTRIBUTES, CLASS_NAMES, FUNCTION_NAMES, FUNCTIONS, METHODS, MODULE_CLASSES, MODULE_INTERNALS,
                         NAME_PATTERN, PATH_PART_PATTERN, NotPortableError)

# The allow-lists are re-exported: this module is where they were first defined.
__all__ = ["ATTRIBUTES", "FUNCTIONS", "METHODS", "MODULE_CLASSES", "NotPortableError", "from_data", "state_dict_data",
           "to_data"]


# ====================================================================== writing


def to_data(gm: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """Describe ``gm`` as plain data plus tensors.

    Leaves that an adapter can replace by a module of ``lightning_layermerge.modules`` are
    stored as that module (same parameters).

    Returns:
        ``(description, tensors)``: a JSON-able dict and the tensors it refers to by key
        (parameters and buffers under their state-dict names).

    Raises:
        NotPortableError: a node target, module class or value is not on the allow-lists.
    """
    writer = _Writer()
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    description = {
        "class_name": type(gm).__name__ if NAME_PATTERN.fullmatch(type(gm).__name__) else "GraphModule",
        "root": writer.module(gm, "", called, leaf=False),
        "nodes": [_node_to_data(n) for n in gm.graph.nodes],
        # State-dict key -> tensor key (a shared tensor is stored once), for rebuilding from a plan.
        "state_dict": {k: writer.tensor(v, k) for k, v in gm.state_dict(keep_vars=True).items()},
    }
    return description, writer.tensors


def state_dict_data(gm: nn.Module) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``gm``'s state dict as (state-dict key -> tensor key, tensors), each tensor stored once."""
    writer = _Writer()
    return {k: writer.tensor(v, k) for k, v in gm.state_dict(keep_vars=True).items()}, writer.tensors


class _Writer:
    """Collects tensors (each tensor object stored once) while modules are described."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.keys: dict[int, str] = {}

    def tensor(self, t: torch.Tensor, key: str) -> str:
        if id(t) not in self.keys:
            self.keys[id(t)] = key
            self.tensors[key] = t.detach().to("cpu").contiguous().clone()
        return self.keys[id(t)]

    def module(self, m: nn.Module, path: str, called: set[str], leaf: bool) -> dict:
        """``m`` at ``path``; below a called module (``leaf``) classes are kept, above it a
        plain ``nn.Module`` container is enough (fx only looks attributes up in it)."""
        leaf = leaf or path in called
        if leaf and type(m) not in CLASS_NAMES:
            m = _stand_in(m, path)
        bad = [k for k in (*m._parameters, *m._buffers, *m._modules) if not PATH_PART_PATTERN.fullmatch(k)]
        if bad:
            raise NotPortableError(f"module {path or '<root>'} has a member named {bad[0]!r}; saved names may hold "
                                   "letters, digits, '_' and '-' only")
        prefix = f"{path}." if path else ""
        out: dict[str, Any] = {"class": CLASS_NAMES[type(m)] if leaf else "torch.nn.Module",
                               "training": m.training}
        if leaf:
            out["attrs"] = {k: _value(v, f"attribute {prefix}{k}", self, f"{prefix}{k}")
                            for k, v in vars(m).items() if k not in MODULE_INTERNALS and k != "training"}
        else:  # a container: only plain tensor attributes (constants fx reads with get_attr)
            out["attrs"] = {k: {"$tensor": self.tensor(v, prefix + k)} for k, v in vars(m).items()
                            if isinstance(v, torch.Tensor) and k not in MODULE_INTERNALS}
        out["params"] = {k: None if v is None else [self.tensor(v, prefix + k), v.requires_grad]
                         for k, v in m._parameters.items()}
        out["buffers"] = {k: None if v is None else self.tensor(v, prefix + k) for k, v in m._buffers.items()}
        out["non_persistent"] = sorted(m._non_persistent_buffers_set)
        out["children"] = {k: None if c is None else self.module(c, prefix + k, called, leaf)
                           for k, c in m._modules.items()}
        return out


def _stand_in(m: nn.Module, path: str) -> nn.Module:
    """The ``lightning_layermerge.modules`` / ``torch.nn`` equivalent an adapter registered for ``m``."""
    what = f"module {path or '<root>'} is a {type(m).__module__}.{type(m).__qualname__}"
    try:
        stand_in = adapters.portable(m)
    except ValueError as err:
        raise NotPortableError(f"{what}: {err}") from err
    if stand_in is None:
        raise NotPortableError(f"{what}, not a torch.nn or lightning_layermerge module")
    return stand_in


#: Library functions saved as an equivalent function of this package, by qualified name.
_STAND_IN_FUNCTIONS = {"torchvision.ops.stochastic_depth.stochastic_depth": portable_modules.stochastic_depth}


def _qualified(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def _node_to_data(node: fx.Node) -> dict:
    out: dict[str, Any] = {"op": node.op, "name": node.name}
    where = f"node {node.name}"
    if node.op == "call_function":
        target = _STAND_IN_FUNCTIONS.get(_qualified(node.target), node.target)
        name = FUNCTION_NAMES.get(id(target))
        if name is None:
            raise NotPortableError(f"{where} calls {_qualified(node.target)}, which is not on the list of functions a "
                                   "saved graph may use")
        if name == "builtins.getattr":
            _check_getattr(node.args, where)
        out["target"] = name
    elif node.op == "call_method":
        if node.target not in METHODS:
            raise NotPortableError(f"{where} calls the method .{node.target}(), which is not on the list of "
                                   "tensor methods a saved graph may use")
        out["target"] = node.target
    elif node.op in ("call_module", "get_attr"):
        out["target"] = str(node.target)
    if node.op == "placeholder":
        if node.args:
            out["default"] = _value(node.args[0], where)
    else:
        out["args"] = _value(tuple(node.args), where)
        out["kwargs"] = _value(dict(node.kwargs), where)
    return out


def _check_getattr(args: tuple, where: str) -> None:
    if len(args) != 2 or not isinstance(args[1], str) or args[1] not in ATTRIBUTES:
        attr = args[1] if len(args) > 1 else "?"
        raise NotPortableError(f"{where} reads the attribute {attr!r}, which a saved graph may not read "
                               f"(allowed: {', '.join(sorted(ATTRIBUTES))})")


def _value(v: Any, where: str, writer: _Writer | None = None, key: str = "") -> Any:
    """Plain-data form of an argument or module attribute."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, float):  # e.g. numpy.float64
        return float(v)
    if isinstance(v, fx.Node):
        return {"$node": v.name}
    if isinstance(v, torch.dtype):
        return {"$dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"$memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, torch.Size):
        return {"$size": list(v)}
    if isinstance(v, slice):
        return {"$slice": [_value(x, where) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"$ellipsis": True}
    if isinstance(v, torch.Tensor) and writer is not None:
        return {"$tensor": writer.tensor(v, key)}
    if isinstance(v, list):
        return [_value(x, where, writer, f"{key}.{i}") for i, x in enumerate(v)]
    if type(v) is tuple:
        return {"$tuple": [_value(x, where, writer, f"{key}.{i}") for i, x in enumerate(v)]}
    if type(v) is dict and all(isinstance(k, str) for k in v):
        return {"$dict": {k: _value(x, where, writer, f"{key}.{k}") for k, x in v.items()}}
    if isinstance(v, (set, frozenset)) and all(isinstance(x, (int, str)) for x in v):
        return {"$set": sorted(v, key=str)}
    raise NotPortableError(f"{where} holds a {type(v).__module__}.{type(v).__qualname__} value, "
                           "which cannot be stored as plain data")


# ====================================================================== reading


def from_data(description: dict, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the GraphModule that :func:`to_data` described.

    Raises:
        ValueError: the description names a function, method, attribute or module class
            that is not allowed, or is malformed (the message names it). Nothing named in
            the description is imported or called while reading it.
    """
    if not isinstance(description, dict) or not {"root", "nodes"} <= set(description):
        raise ValueError("the graph description has no 'root' and 'nodes'")
    root = _ModuleReader(tensors).module(description["root"], "")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for entry in description["nodes"]:
        node = _node_from_data(entry, graph, nodes, root)
        nodes[entry["name"]] = node
    graph.lint()
    class_name = description.get("class_name", "GraphModule")
    return fx.GraphModule(root, graph, class_name if _is_name(class_name) else "GraphModule")


def _is_name(s: Any) -> bool:
    return isinstance(s, str) and bool(NAME_PATTERN.fullmatch(s)) and not keyword.iskeyword(s)


def _check_path(path: Any, what: str) -> str:
    if not isinstance(path, str) or not path or not all(PATH_PART_PATTERN.fullmatch(p) for p in path.split(".")):
        raise ValueError(f"{what} {path!r} is not a dotted module path")
    return path


class _ModuleReader:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def tensor(self, key: Any, where: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise ValueError(f"{where} refers to tensor {key!r}, which the file does not hold")
        return self.tensors[key]

    def module(self, data: dict, path: str) -> nn.Module:
        where = f"module {path or '<root>'}"
        name = data.get("class")
        cls = MODULE_CLASSES.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"{where} has class {name!r}, which is not on the list of module classes a saved "
                             "network may use (torch.nn modules and lightning_layermerge.modules); it is not imported")
        m = cls.__new__(cls)
        nn.Module.__init__(m)  # the bookkeeping only; cls's own constructor does not run
        m.training = bool(data.get("training", False))
        for key, raw in data.get("attrs", {}).items():
            shadows_method = callable(getattr(cls, key, None))
            if not _is_name(key) or key in MODULE_INTERNALS or key.startswith("__") or shadows_method:
                raise ValueError(f"{where}: attribute name {key!r} is not allowed")
            m.__dict__[key] = _decode(raw, f"{where}.{key}", None, self)
        for key, entry in data.get("params", {}).items():
            _check_key(key, where)
            if entry is None:
                m._parameters[key] = None
            else:
                m._parameters[key] = nn.Parameter(self.tensor(entry[0], where), requires_grad=bool(entry[1]))
        for key, entry in data.get("buffers", {}).items():
            _check_key(key, where)
            m._buffers[key] = None if entry is None else self.tensor(entry, where)
        for key in data.get("non_persistent", []):
            _check_key(key, where)
            m._non_persistent_buffers_set.add(key)
        for key, child in data.get("children", {}).items():
            _check_key(key, where)
            m._modules[key] = None if child is None else self.module(child, f"{path}.{key}" if path else key)
        return m


def _check_key(key: Any, where: str) -> None:
    if not isinstance(key, str) or not PATH_PART_PATTERN.fullmatch(key):
        raise ValueError(f"{where}: member name {key!r} is not allowed")


def _node_from_data(entry: dict, graph: fx.Graph, nodes: dict[str, fx.Node], root: nn.Module) -> fx.Node:
    op, name = entry.get("op"), entry.get("name")
    if not _is_name(name) or name in nodes:
        raise ValueError(f"node name {name!r} is not an identifier or is used twice")
    where = f"node {name}"
    if op == "placeholder":
        default = _decode(entry["default"], where, nodes) if "default" in entry else inspect.Signature.empty
        node = graph.placeholder(name, default_value=default)
    else:
        args = _decode(entry.get("args", {"$tuple": []}), where, nodes)
        kwargs = _decode(entry.get("kwargs", {"$dict": {}}), where, nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict) or not all(_is_name(k) for k in kwargs):
            raise ValueError(f"{where}: malformed args/kwargs")
        node = _create(op, entry.get("target"), args, kwargs, graph, root, where, name)
    return node


def _create(op: Any, target: Any, args: tuple, kwargs: dict, graph: fx.Graph, root: nn.Module,
            where: str, name: str) -> fx.Node:
    """The node for one entry; ``name`` is a hint (fx renames reserved words and duplicates)."""
    if op == "call_function":
        fn = FUNCTIONS.get(target) if isinstance(target, str) else None
        if fn is None:
            raise ValueError(f"{where} calls {target!r}, which is not on the list of functions a saved graph may "
                             "use; it is not imported")
        if target == "builtins.getattr":
            _check_getattr(args, where)
        return graph.create_node(op, fn, args, kwargs, name=name)
    if op == "call_method":
        if target not in METHODS:
            raise ValueError(f"{where} calls the method {target!r}, which is not on the list of tensor methods a "
                             "saved graph may use")
        return graph.create_node(op, target, args, kwargs, name=name)
    if op == "call_module":
        path = _check_path(target, f"{where}: module")
        try:
            root.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"{where} calls module {path!r}, which the file does not define") from err
        return graph.create_node(op, path, args, kwargs, name=name)
    if op == "get_attr":
        path = _check_path(target, f"{where}: attribute")
        owner, _, attr = path.rpartition(".")
        try:
            value = getattr(root.get_submodule(owner), attr)
        except AttributeError as err:
            raise ValueError(f"{where} reads {path!r}, which the file does not define") from err
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where} reads {path!r}, which is not a tensor")
        return graph.create_node(op, path, (), {}, name=name)
    if op == "output":
        if len(args) != 1 or kwargs:
            raise ValueError(f"{where}: the output node takes one argument")
        return graph.create_node(op, "output", args, {}, name=name)
    raise ValueError(f"{where} has unknown op {op!r}")


_TAGS = ("$node", "$dtype", "$device", "$memory_format", "$size", "$slice", "$ellipsis", "$tensor", "$tuple",
         "$dict", "$set")


def _decode(v: Any, where: str, nodes: dict[str, fx.Node] | None, reader: _ModuleReader | None = None) -> Any:
    """Inverse of :func:`_value`; only plain data, torch dtypes/devices/formats and earlier nodes come out."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_decode(x, where, nodes, reader) for x in v]
    if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in _TAGS:
        raise ValueError(f"{where}: unrecognised value {str(v)[:80]!r}")
    tag, x = next(iter(v.items()))
    if tag == "$node":
        if nodes is None or x not in nodes:
            raise ValueError(f"{where} refers to node {x!r}, which does not come before it")
        return nodes[x]
    if tag == "$dtype":
        return _torch_constant(x, torch.dtype, where)
    if tag == "$memory_format":
        return _torch_constant(x, torch.memory_format, where)
    if tag == "$device":
        try:
            return torch.device(x)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"{where}: bad device {x!r}") from err
    if tag == "$size":
        return torch.Size([int(i) for i in x])
    if tag == "$slice":
        start, stop, step = (_decode(i, where, nodes, reader) for i in x)
        return slice(start, stop, step)
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$tensor":
        if reader is None:
            raise ValueError(f"{where}: a tensor is not allowed here")
        return reader.tensor(x, where)
    if tag == "$tuple":
        return tuple(_decode(i, where, nodes, reader) for i in x)
    if tag == "$dict":
        if not isinstance(x, dict):
            raise ValueError(f"{where}: bad dict")
        return {k: _decode(i, where, nodes, reader) for k, i in x.items()}
    if not isinstance(x, list) or not all(isinstance(i, (int, str)) for i in x):
        raise ValueError(f"{where}: bad set")
    return set(x)


def _torch_constant(name: Any, kind: type, where: str) -> Any:
    value = getattr(torch, name, None) if isinstance(name, str) and _is_name(name) else None
    if not isinstance(value, kind):
        raise ValueError(f"{where}: {name!r} is not a torch {kind.__name__}")
    return value
