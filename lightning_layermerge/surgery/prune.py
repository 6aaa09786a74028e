"""Apply a plan to a network: remove activations and convolutions, move padding (``prune``).

The result is a trainable ``torch.fx.GraphModule`` that computes, in every segment, a
chain of *unpadded* convolutions on an input padded once (the paper: "move all padding of
a merge block to its input"), so that :func:`~lightning_layermerge.surgery.merge.merge` is exact
after any amount of fine-tuning.

A GroupNorm (``Kind.MOVABLE_NORM``) between convs of one segment cannot be folded; it is
moved after the segment's output, keeping only the last (the paper's DDPM rule). Dropout
between merged convs stays where it is: active while fine-tuning the pruned network (it
then regularises the still separate convs), the identity in eval mode, where ``merge`` is
exact. A per-channel bias added between them (a UNet's time embedding) stays too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx, nn

from .capture import capture
from .analysis import ChainAnalysis
from .chain import Chain, Segment
from .ops import Kind
from .meta import MergeRegion, SurgeryMeta
from .plan import Plan

@dataclass(frozen=True)
class Region:
    """Where one segment lives while the graph is rewritten (node names of the captured graph);
    :meth:`_Rewriter.resolve_region` turns it into the stored :class:`MergeRegion`."""

    i: int
    j: int
    k: int
    convs: tuple[int, ...]
    entry: str  # node whose value the segment reads
    output: str  # node whose value the merged conv produces
    padding: int  # total padding moved to the entry (0 if not moved)


def prune(
    model: nn.Module,
    chain: Chain,
    plan: Plan,
    *,
    bottleneck_activation: Callable[[], nn.Module] | None = None,
) -> fx.GraphModule:
    """Build the pruned, trainable network for ``plan``; ``model`` is left untouched.

    Args:
        model: the network ``chain`` was traced from (its current weights are used).
        chain: from :func:`~lightning_layermerge.trace`.
        plan: a :class:`~lightning_layermerge.Plan` for ``chain``.
        bottleneck_activation: if given (e.g. ``nn.ReLU6``), a fresh activation from this
            factory is inserted after every merged segment (more than one chain conv) that
            ends on a position without activation, i.e. a linear bottleneck. This is the
            MobileNetV2 option of the paper (Appendix A); it changes the function, so use it
            before fine-tuning.

    Returns:
        A GraphModule with the same call signature and outputs as ``model``, in the same
        train/eval mode. Its ``meta["layermerge"]`` records the segments for ``merge``.
        It owns copies of all of ``model``'s weights, unchanged layers included, so that
        fine-tuning it never changes ``model`` (``merge``, which makes the network to
        deploy once fine-tuning is done, shares the layers it keeps with its input instead).

    Raises:
        ValueError: the plan was made for another chain, or ``model`` does not match it.
    """
    if plan.fingerprint != chain.fingerprint:
        raise ValueError("the plan was made for a different chain; build it from this chain")
    cap = capture(model, chain.example, shapes=chain.capture.shapes)
    analysis = ChainAnalysis(cap, chain.model_name)
    _check_same_architecture(analysis, chain)
    rewriter = _Rewriter(cap.gm, analysis)
    regions = [rewriter.apply(seg) for seg in plan.segments]
    # After every segment is in place: a moved norm changes which node the next segment reads.
    for seg, region in zip(plan.segments, regions):
        rewriter.move_norms(seg, region)
    if bottleneck_activation is not None:
        for seg in plan.segments:
            rewriter.add_bottleneck_activation(seg, bottleneck_activation)
    gm = rewriter.finish()
    SurgeryMeta(plan=plan.to_dict(), regions=[rewriter.resolve_region(r) for r in regions]).write(gm)
    gm.train(model.training)
    return gm


def _check_same_architecture(analysis: ChainAnalysis, chain: Chain) -> None:
    ours = [(l.name, l.in_shape, l.out_shape, l.kernel, l.stride) for l in analysis.layers]
    theirs = [(l.name, l.in_shape, l.out_shape, l.kernel, l.stride) for l in chain.layers]
    channels = [(l.in_channels, l.out_channels, l.groups) for l in analysis.layers]
    if ours != theirs or channels != [(l.in_channels, l.out_channels, l.groups) for l in chain.layers]:
        raise ValueError(
            "the model does not match the chain it is pruned with (different layers or shapes); "
            "trace this model first"
        )


class _Rewriter:
    """Graph surgery on a captured GraphModule, segment by segment."""

    def __init__(self, gm: fx.GraphModule, analysis: ChainAnalysis) -> None:
        self.gm = gm
        self.a = analysis
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.alias: dict[str, fx.Node] = {}
        self.new_entries: dict[str, fx.Node] = {}  # entry -> inserted activation that now follows it

    def node(self, name: str) -> fx.Node:
        """The live node for ``name``, following removals."""
        node = self.nodes[name]
        while node.name in self.alias:
            node = self.alias[node.name]
        return node

    def _bypass(self, name: str) -> None:
        node = self.node(name)
        source = node.args[0]
        node.replace_all_uses_with(source)
        self.alias[node.name] = source
        self.gm.graph.erase_node(node)

    def apply(self, seg: Segment) -> Region:
        a = self.a
        for p in range(seg.i + 1, seg.j):
            act = a.positions[p].activation
            if act is not None:
                self._bypass(act)
        for l in range(seg.i + 1, seg.j + 1):
            if l not in seg.convs:
                layer = a.layers[l - 1]
                if layer.norm is not None:
                    self._bypass(layer.norm)
                self._bypass(layer.node)
        entry = a.positions[seg.i].entry
        self._rewire_folds_to_entry(seg, self.node(entry))
        output = self._region_output(seg)
        padding = 0
        if self._needs_padding_moved(seg, entry):
            padding = self._move_padding(seg, entry)
        return Region(seg.i, seg.j, seg.k, seg.convs, entry, output, padding)

    def _region_output(self, seg: Segment) -> str:
        """Position j's cut, or the main operand of an addition the segment ends on."""
        ends = [s for s in self.a.skips if self.a.skip_role(s, seg.i, seg.j) == "end"]
        if not ends:
            return self.a.positions[seg.j].cut
        first = min(ends, key=lambda s: self.a.where[s.add][1])
        return self.a.path[self.a.path.index(first.add) - 1]

    def _folds(self, seg: Segment) -> list:
        return [s for s in self.a.skips if self.a.skip_role(s, seg.i, seg.j) == "fold"]

    def _needs_padding_moved(self, seg: Segment, entry: str) -> bool:
        """Padding stays in place only for a lone conv that reads the segment input."""
        if len(seg.convs) == 0:
            return False
        if len(seg.convs) > 1:
            return True
        conv = self.node(self.a.layers[seg.convs[0] - 1].node)
        return conv.args[0] is not self.node(entry) and self.a.layers[seg.convs[0] - 1].padding > 0

    def _remaining_padding(self, seg: Segment) -> dict[int, int]:
        """r[p]: padding (in position p's pixels) still to be consumed after position p."""
        r = {seg.j: 0}
        for l in range(seg.j, seg.i, -1):
            layer = self.a.layers[l - 1]
            r[l - 1] = r[l] * layer.stride + layer.padding if l in seg.convs else r[l]
        return r

    def _move_padding(self, seg: Segment, entry_name: str) -> int:
        r = self._remaining_padding(seg)
        total = r[seg.i]
        for l in seg.convs:
            conv = self.gm.get_submodule(str(self.node(self.a.layers[l - 1].node).target))
            conv.padding = (0, 0)
        entry = self.node(entry_name)
        readers = [self._main_successor(entry, seg)] + [
            self._head(s) for s in self._folds(seg) if s.source_position == seg.i
        ]
        with self.gm.graph.inserting_after(entry):
            pad = self.gm.graph.call_function(F.pad, (entry, (total,) * 4))
        for user in readers:
            user.replace_input_with(entry, pad)
        for skip in self._folds(seg):
            source = pad if skip.source_position == seg.i else self.node(skip.source)
            self._crop_shortcut(skip, source, r)
        return total

    def _head(self, skip) -> fx.Node:
        """First node of a skip's shortcut (the add itself for an identity shortcut)."""
        return self.node(skip.shortcut[0] if skip.shortcut else skip.add)

    def _rewire_folds_to_entry(self, seg: Segment, entry: fx.Node) -> None:
        """Shortcuts folded from the segment input read the input itself (not a copy of it)."""
        for skip in self._folds(seg):
            source = self.node(skip.source)
            if skip.source_position == seg.i and source is not entry:
                self._head(skip).replace_input_with(source, entry)

    def _main_successor(self, entry: fx.Node, seg: Segment) -> fx.Node:
        """The live node after the segment input on the main path."""
        path = self.a.path
        for name in path[path.index(self.a.conv_nodes[seg.i]):]:
            if name not in self.alias:
                return self.nodes[name]
        raise AssertionError("segment without a live node")  # pragma: no cover

    def _crop_shortcut(self, skip, source: fx.Node, r: dict[int, int]) -> None:
        """Crop the shortcut's input so it lines up with the padded branch."""
        stride = 1
        for name in skip.shortcut:
            if self.a.ops[name].kind is Kind.CONV:
                stride *= self.gm.get_submodule(str(self.node(name).target)).stride[0]
        crop = r[skip.source_position] - r[skip.position] * stride
        if crop == 0:
            return
        head = self._head(skip)
        with self.gm.graph.inserting_before(head):
            cropped = self.gm.graph.call_function(F.pad, (source, (-crop,) * 4))
        head.replace_input_with(source, cropped)

    def add_bottleneck_activation(self, seg: Segment, factory: Callable[[], nn.Module]) -> None:
        """Insert an activation after a merged segment that ends on a linear bottleneck."""
        pos = self.a.positions[seg.j]
        if seg.j - seg.i < 2 or pos.activation is not None or seg.j == self.a.positions[-1].index:
            return
        cut = self.node(pos.cut)
        anchor = self.new_entries.get(cut.name, cut)  # after a norm moved there, if any
        name = f"layermerge_act_{seg.j}"
        self.gm.add_submodule(name, factory())
        with self.gm.graph.inserting_after(anchor):
            act = self.gm.graph.call_module(name, (anchor,))
        anchor.replace_all_uses_with(act, delete_user_cb=lambda u: u is not act)
        self.new_entries[cut.name] = act  # the next segment reads the activation's output

    def move_norms(self, seg: Segment, region: Region) -> None:
        """Move the movable norms (GroupNorm) inside ``seg`` to after its output.

        The paper's DDPM rule (Appendix A): a GroupNorm cannot be folded into a conv, so every
        one that sits between convs to be merged is moved after them and only the last is
        kept (its module, with its affine parameters). If the segment's end is already
        followed by such a norm, that one is the last and none is inserted. If the channel
        count differs at the new place, a fresh GroupNorm (same eps, affine; the largest
        group count that divides both) takes its place; training adapts it.
        """
        a = self.a
        norms = [n for p in range(seg.i + 1, seg.j) for n in a.positions[p].nodes
                 if a.ops[n].kind is Kind.MOVABLE_NORM]
        if not norms:
            return
        target = str(self.node(norms[-1]).target)
        for name in norms:
            self._bypass(name)
        if self._norm_follows(seg, region):
            return
        out = self.node(region.output)
        channels = a.cap.shapes[region.output][1]
        module = self.gm.get_submodule(target)
        if getattr(module, "num_channels", channels) != channels:
            ref = next(module.parameters(), None)
            fresh = nn.GroupNorm(math.gcd(module.num_groups, channels), channels, module.eps, module.affine)
            target = f"layermerge_norm_{seg.i}_{seg.j}"
            self.gm.add_submodule(target, fresh.to(ref) if ref is not None else fresh)
        with self.gm.graph.inserting_after(out):
            norm = self.gm.graph.call_module(target, (out,))
        out.replace_all_uses_with(norm, delete_user_cb=lambda u: u is not norm)
        self.new_entries[out.name] = norm  # a segment starting here reads the normalised value

    def _norm_follows(self, seg: Segment, region: Region) -> bool:
        """Whether a movable norm already follows the segment output (through identities)."""
        pos = self.a.positions[seg.j]
        if region.output != pos.cut:
            return False
        after = pos.nodes[pos.nodes.index(pos.cut) + 1:] if pos.cut in pos.nodes else pos.nodes
        first = next((n for n in after if self.a.ops[n].kind is not Kind.IDENTITY), None)
        return first is not None and self.a.ops[first].kind is Kind.MOVABLE_NORM

    def resolve_region(self, region: Region) -> MergeRegion:
        """The region with node names resolved to the final graph."""
        return MergeRegion(
            region.i, region.j, region.k, tuple(region.convs),
            entry=self.new_entries.get(self.node(region.entry).name, self.node(region.entry)).name,
            output=self.node(region.output).name, padding=region.padding,
            channels=self.a.cap.shapes[region.entry][1], in_hw=tuple(self.a.cap.shapes[region.entry][2:]),
        )

    def finish(self) -> fx.GraphModule:
        self.gm.graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
        return self.gm
