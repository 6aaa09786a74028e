"""Merge every segment of a pruned network into one convolution (``merge``).

The tensor math is exact composition of affine, translation-equivariant maps, done in
float64 (:mod:`~lightning_layermerge.surgery.affine`); this module walks each segment's
graph from its entry to its output and replaces it by the composed convolution.

An addition of a per-channel value ``b`` (shape (N, C, 1, 1)) computed outside the segment,
such as a diffusion UNet's time embedding, is carried as a bias term ``M @ b``: each later
conv multiplies ``M`` by the sum of its taps (exact, since the segment's padding was moved
to its input, so ``b`` stays spatially constant), BatchNorm scales it. The merged segment
computes ``conv(x) + conv1x1_M(b)``, i.e. a new projection of the embedding.

``merge(pruned, share=True)`` does not copy the weights of layers outside the merged segments:
the merged network shares their tensors with the pruned one. For a pruned network that is
thrown away after merging this saves a copy that can cost more than the merge itself (vgg16's
138M-parameter classifier); the default copies, so the two networks stay independent.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import skip_init

from .affine import AffineConv, Map, Pointwise, deferrable, regroup, resolved, sum_maps
from .meta import MergeRegion, SurgeryMeta
from .ops import Kind, classify

__all__ = ["AffineConv", "merge"]


def merge(pruned: fx.GraphModule, *, share: bool = False) -> fx.GraphModule:
    """Replace every segment of a pruned network by one convolution (BatchNorm folded).

    Args:
        pruned: the output of :func:`~lightning_layermerge.prune`, possibly fine-tuned.
        share: Let the layers outside the merged segments share tensors with ``pruned``
            instead of copying them (faster and lighter; see below). Use it when ``pruned``
            is discarded after merging.

    Returns:
        A new GraphModule in eval mode that equals ``pruned`` in eval mode, with one conv
        (or nothing, for an identity segment) per segment. ``pruned`` is not modified.

        With ``share=True`` the layers outside the merged segments (a classifier head, a
        stem, barriers) share their parameter and buffer *tensors* with ``pruned``. Module
        and ``nn.Parameter`` objects are still new, so ``.train()``/``.eval()``, ``.to(...)``,
        ``.float()`` or ``requires_grad_`` on one network never affect the other; in-place
        writes to the shared values do: an optimizer step or ``load_state_dict`` on either
        network, or BatchNorm statistics updated in train mode, change both.

    Raises:
        TypeError: ``pruned`` did not come from ``prune``.
        ValueError: the graph no longer has the structure ``prune`` produced.
    """
    if not SurgeryMeta.present(pruned):
        raise TypeError("merge expects the network returned by lightning_layermerge.prune(...)")
    meta = SurgeryMeta.of(pruned)
    if meta.merged:
        raise ValueError("this network is already merged")
    gm = (_copy_sharing_tensors(pruned) if share else copy.deepcopy(pruned)).eval()
    # Last segment first: a segment's entry is the previous segment's output node, which
    # must still exist (by name) when the later segment is merged.
    for region in reversed(meta.regions):
        _merge_region(gm, region)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    meta.merged = True
    meta.write(gm)
    return gm.eval()


def _copy_sharing_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (graph, modules, hooks, meta) whose parameters and buffers
    share storage with ``gm``'s (see :func:`merge` for what that means to the caller).

    ``merge`` only reads the weights of the layers it replaces (it composes new tensors) and
    never writes to the ones it keeps, so nothing of ``gm`` is modified through the copy.
    Parameters get new ``nn.Parameter`` objects over the same storage (their ``.data`` can be
    rebound independently, e.g. by ``.float()``); buffers are the same tensors (a module
    conversion rebinds its own buffer dict entry). Tied parameters stay tied.
    """
    memo: dict[int, Any] = {}
    for p in gm.parameters():
        if type(p) is nn.Parameter:  # a Parameter subclass is left to deepcopy
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for b in gm.buffers():
        memo[id(b)] = b
    return copy.deepcopy(gm, memo)


def _merge_region(gm: fx.GraphModule, region: MergeRegion) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    entry, output = nodes[region.entry], nodes[region.output]
    if output is entry:
        return  # an identity segment merges to nothing
    modules = dict(gm.named_modules())
    members, external = _region_members(entry, output, modules)
    if not external and all(classify(n, modules).kind is Kind.IDENTITY for n in members):
        output.replace_all_uses_with(entry)  # only dropout/identity left: merges to nothing
        return
    padding = _input_padding(members, entry, modules)
    shape_c = region.channels
    device = next(iter(gm.parameters())).device if any(True for _ in gm.parameters()) else torch.device("cpu")
    maps: dict[fx.Node, Map] = {}
    base = AffineConv.identity(shape_c, device, padding, max(region.in_hw))
    like: torch.Tensor | None = None
    biases: dict[fx.Node, dict[fx.Node, torch.Tensor]] = {}  # see _carry_biases
    # Free each map after its last reader: a long segment of wide convs holds one merged
    # kernel per node (1.3 GB each for 2048 channels at 9x9 in float64).
    last_use = {a: n for n in members for a in n.all_input_nodes}
    for node in members:  # members are in graph (topological) order
        if node in external:  # x + b, b from outside: the map of x, plus b as a bias term
            main = next(a for a in node.args if a is not external[node])
            maps[node] = base.crop(padding) if main is entry else maps[main]
            maps[node] = resolved(maps[node])
            eye = torch.eye(maps[node].weight.shape[0], dtype=torch.float64, device=device)
            biases[node] = _sum_biases(biases.get(main, {}), {external[node]: eye})
            continue
        maps[node], param = _step(node, maps, entry, base, padding, modules)
        biases[node] = _carry_biases(node, biases, modules)
        like = param if param is not None and like is None else like
        for done in [a for a in node.all_input_nodes if last_use.get(a) is node and a is not output]:
            maps.pop(done, None)
            biases.pop(done, None)
    final, terms = resolved(maps[output]), biases[output]
    if like is None:
        like = next(iter(gm.parameters()), torch.zeros(()))
    name = f"merged_{region.i}_{region.j}"
    with gm.graph.inserting_before(output):
        if terms and _is_identity(final):
            new = entry  # e.g. all convs removed, only the bias is left
        else:
            gm.add_submodule(name, final.to_conv(like))
            new = gm.graph.call_module(name, (entry,))
        for k, (source, matrix) in enumerate(terms.items()):
            # The bias pushed through the segment's convs: a 1x1 conv of the (N, C, 1, 1)
            # source (e.g. a new time-embedding projection), then one broadcast add.
            proj = skip_init(nn.Conv2d, matrix.shape[1], matrix.shape[0], 1, bias=False,
                             device=like.device, dtype=like.dtype)
            with torch.no_grad():
                proj.weight.copy_(matrix[:, :, None, None])
            gm.add_submodule(f"{name}_bias{k}", proj)
            new = gm.graph.call_function(operator.add, (new, gm.graph.call_module(f"{name}_bias{k}", (source,))))
    output.replace_all_uses_with(new)


def _is_identity(m: AffineConv) -> bool:
    """Whether the map is the unpadded segment input itself."""
    c = m.weight.shape[0]
    return (m.crop_of_identity == 0 and m.pad == 0 and m.stride == 1 and m.groups == c and m.kernel == 1
            and bool((m.weight == 1).all()) and not bool(m.bias.any()))


def _sum_biases(a: dict, b: dict) -> dict:
    out = dict(a)
    for source, matrix in b.items():
        out[source] = out[source] + matrix if source in out else matrix
    return out


def _carry_biases(node: fx.Node, biases: dict, modules: dict[str, nn.Module]) -> dict:
    """Bias terms of ``node``: {source b: M} meaning "+ M @ b" (b is (N, C_b, 1, 1), M [C, C_b]).

    A per-channel constant stays constant through everything inside a segment (its padding
    was moved to the segment input), so a conv maps it by the sum of its taps and a
    BatchNorm scales it; identities, pads and crops leave it alone.
    """
    def of(n: Any) -> dict:
        return biases.get(n, {}) if isinstance(n, fx.Node) else {}

    op = classify(node, modules)
    if op.kind is Kind.ADD:
        return _sum_biases(of(node.args[0]), of(node.args[1]))
    terms = of(node.args[0])
    if not terms:
        return {}
    if op.kind is Kind.CONV:
        conv = modules[str(node.target)]
        taps = conv.weight.detach().to(torch.float64).sum(dim=(2, 3), keepdim=True)
        dense = regroup(taps, conv.groups, 1)[:, :, 0, 0]  # [C_out, C_in]
        return {src: dense @ m for src, m in terms.items()}
    if op.kind is Kind.NORM:
        bn = modules[str(node.target)]
        scale = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(torch.float64)
        return {src: scale[:, None] * m for src, m in terms.items()}
    return terms  # identity, pad, crop


def _region_members(entry: fx.Node, output: fx.Node,
                    modules: dict[str, nn.Module]) -> tuple[list[fx.Node], dict[fx.Node, fx.Node]]:
    """Nodes between ``entry`` (excluded) and ``output`` (included), in graph order, and the
    additions among them whose other operand comes from outside the segment (add -> operand).

    Only an addition may read a value from outside (a per-channel bias such as a diffusion
    UNet's time embedding, which ``trace`` checked is independent of the input).
    """
    downstream: set[fx.Node] = set()
    stack = [entry]
    while stack:
        for user in stack.pop().users:
            if user not in downstream:
                downstream.add(user)
                stack.append(user)
    members: set[fx.Node] = set()
    external: dict[fx.Node, fx.Node] = {}
    stack = [output]
    while stack:
        node = stack.pop()
        if node is entry or node in members:
            continue
        if node.op in ("placeholder", "output") or node not in downstream:
            raise ValueError(f"segment ending at {output.name} reads a value from outside it ({node.name})")
        members.add(node)
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
        outside = [n for n in inputs if n is not entry and n not in downstream]
        if len(inputs) == 2 and len(outside) == 1 and classify(node, modules).kind is Kind.ADD:
            external[node] = outside[0]
            inputs.remove(outside[0])
        stack.extend(inputs)
    return [n for n in output.graph.nodes if n in members], external




def _input_padding(members: list[fx.Node], entry: fx.Node, modules: dict[str, nn.Module]) -> int:
    """Padding of the segment input: the inserted pad, else a lone conv's own padding."""
    pads = [n for n in members if n.target is F.pad and n.args[0] is entry]
    if pads:
        return int(pads[0].args[1][0])
    readers = [modules[str(n.target)] for n in members if n.op == "call_module" and n.args[0] is entry
               and isinstance(modules[str(n.target)], nn.Conv2d)]
    return max((c.padding[0] for c in readers), default=0)


def _step(node: fx.Node, maps: dict, entry: fx.Node, base: AffineConv, padding: int,
          modules: dict[str, nn.Module]) -> tuple[Map, torch.Tensor | None]:
    """The map of ``node`` from the maps of its inputs."""

    def value(n: fx.Node) -> Map:
        return base.crop(padding) if n is entry else maps[n]

    # `base` is the padded input; the unpadded input is `base` cropped by `padding`.

    op = classify(node, modules)
    if op.kind is Kind.PAD:
        amount = int(node.args[1][0])
        if node.args[0] is entry and amount == padding:
            return base, None
        if amount <= 0:
            return resolved(value(node.args[0])).crop(-amount), None
    if op.kind is Kind.CONV:
        conv = modules[str(node.target)]
        src = node.args[0]
        p = conv.padding[0]
        if p and src is not entry:
            raise ValueError(f"conv {node.target} pads a value inside a merged segment; prune first")
        start = base.crop(padding - p) if src is entry else maps[src]
        if deferrable(start, conv):
            start = start if isinstance(start, Pointwise) else Pointwise.over(start)
            return start.then_conv(conv), conv.weight
        return resolved(start).then_conv(conv), conv.weight
    if op.kind is Kind.NORM:
        return value(node.args[0]).then_norm(modules[str(node.target)]), None
    if op.kind is Kind.IDENTITY:
        return value(node.args[0]), None
    if op.kind is Kind.ADD:
        left, right = node.args
        return sum_maps(value(left), value(right)), None
    raise ValueError(f"cannot merge {node.name}: {op.reason or op.kind.value} inside a segment")
