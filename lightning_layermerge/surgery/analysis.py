"""How :func:`~lightning_layermerge.trace` finds the chain in a captured fx graph (:class:`ChainAnalysis`).

The chain is found generically on the captured fx graph:

* The *main path* is the path from the input to the output that passes through the most
  supported convolutions. Its convolutions are the chain layers 1..L; convolutions off it
  (shortcut projections, squeeze-excitation gates that lose the count, other branches)
  are left as they are.
* Between chain conv l and conv l+1 lies *junction* l (position l): normalisation, at most
  one activation, residual additions, identities, or barriers.
* A position is *forced* (always a segment boundary) when its junction holds a barrier,
  two activations, or a tensor used somewhere the merge cannot account for.
* A residual addition is a *skip* from a source position a to the addition's position b.
  A segment (i, j] may fold it when it holds the whole branch (source inside or at the
  segment input); it may end on it when the source lies outside; any other overlap is
  illegal.

Nothing here is architecture-specific; model-family knowledge lives in ``adapters``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch import fx

from .affine import unreachable_taps
from .capture import Capture
from .chain import Chain, Layer, Position, Segment, Skip, may_keep
from .ops import LINEAR_KINDS, Kind, Op, classify

__all__ = ["ChainAnalysis"]


class ChainAnalysis:
    """Graph analysis behind :func:`~lightning_layermerge.trace`: main path, junctions, skips, legal
    segments. ``prune`` uses it too, to locate each segment in the graph it rewrites."""

    def __init__(self, cap: Capture, model_name: str) -> None:
        self.cap = cap
        self.graph = cap.gm.graph
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.modules = cap.modules()
        self.ops = {n.name: self._classify(n) for n in self.graph.nodes}
        self.path = self._main_path(model_name)
        self._check_biases()
        self.conv_nodes = [n for n in self.path if self.ops[n].kind is Kind.CONV]
        if not self.conv_nodes:
            reasons = sorted({op.reason for op in self.ops.values() if op.reason.startswith("conv ")})
            raise ValueError(
                f"{model_name} has no supported convolution on its main path"
                + (f" ({'; '.join(reasons[:3])})" if reasons else "")
                + ". LayerMerge merges square, undilated, zero-padded nn.Conv2d layers."
            )
        self.junctions = self._junctions()
        self.where = self._locate()
        self.skips = self._skips()
        self.layers = self._layers()
        self.positions = self._positions()

    @classmethod
    def from_chain(cls, chain: Chain) -> ChainAnalysis:
        return cls(chain.capture, chain.model_name)

    # -- node classification --------------------------------------------------------------
    def _classify(self, node: fx.Node) -> Op:
        op = classify(node, self.modules)
        if op.kind is Kind.ADD:
            a, b = (self.cap.shapes.get(x.name) for x in node.args)
            if self._bias_operand(node) is not None:
                return Op(Kind.BIAS)  # provisional: _check_biases also needs the main path
            if a is None or a != b or a != self.cap.shapes.get(node.name):
                return Op(Kind.BARRIER, "broadcasting add")
        if op.kind in (Kind.ACT, Kind.NORM, Kind.IDENTITY, Kind.MOVABLE_NORM):
            ins = _inputs(node)
            if len(ins) != 1 or self.cap.shapes.get(node.name) != self.cap.shapes.get(ins[0].name):
                return Op(Kind.BARRIER, f"{op.kind.value} {node.name} with unusual inputs")
        return op

    def _bias_operand(self, node: fx.Node) -> fx.Node | None:
        """For ``x + b`` with b shaped (N or 1, C, 1, 1) and x like the result: the node b."""
        out = self.cap.shapes.get(node.name)
        shapes = [self.cap.shapes.get(x.name) for x in node.args]
        if out is None or len(out) != 4 or None in shapes:
            return None
        for main, other in ((0, 1), (1, 0)):
            b = shapes[other]
            if shapes[main] == out and b != out and len(b) == 4 and b[0] in (1, out[0]) and b[1:] == (out[1], 1, 1):
                return node.args[other]
        return None

    def _check_biases(self) -> None:
        """A per-channel bias must not depend on the data input (only then is it a constant
        of the segment it lies in); otherwise the add is a barrier."""
        data = _value_descendants(self.nodes[self.path[0]])
        for name, op in self.ops.items():
            if op.kind is Kind.BIAS and self._bias_operand(self.nodes[name]) in data:
                self.ops[name] = Op(Kind.BARRIER, "per-channel add of a value computed from the input")

    # -- main path ----------------------------------------------------------------------
    def _main_path(self, model_name: str) -> list[str]:
        """Input-to-output path through the most supported convs (ties: first argument)."""
        score: dict[str, int] = {}
        best_pred: dict[str, str | None] = {}
        output = None
        for node in self.graph.nodes:
            if node.op == "placeholder" and node.name in self.cap.shapes:
                score[node.name], best_pred[node.name] = 0, None
                continue
            preds = [p.name for p in _inputs(node) if p.name in score]
            if node.op == "output":
                # Look through a non-tensor wrapper of the result (diffusers' UNet2DOutput).
                wrapped = [q.name for p in _inputs(node) if p.name not in score for q in _inputs(p)]
                output = (node.name, preds + [q for q in wrapped if q in score])
                continue
            if not preds:
                continue
            # Non-tensor values stay on paths: a split into a tuple, read back by getitem
            # (MixConv, Res2Net), is a barrier on the main path, not its end. Between equal
            # scores a tensor is preferred over a non-tensor (a shape read), then the first.
            top = max(preds, key=lambda p: (score[p], p in self.cap.shapes))  # max keeps the first of equals
            score[node.name] = score[top] + (self.ops[node.name].kind is Kind.CONV)
            best_pred[node.name] = top
        if output is None or not output[1]:
            raise ValueError(f"{model_name}: no tensor path from the input to the output was found")
        cur: str | None = max(output[1], key=lambda p: score[p])
        path: list[str] = []
        while cur is not None:
            path.append(cur)
            cur = best_pred[cur]
        return path[::-1]

    def _junctions(self) -> list[list[str]]:
        idx = [self.path.index(c) for c in self.conv_nodes]
        bounds = [0] + [i + 1 for i in idx]
        ends = idx + [len(self.path)]
        return [self.path[b:e] for b, e in zip(bounds, ends)]

    def _locate(self) -> dict[str, tuple[int, int]]:
        """Main-path node -> (position, index in its junction); conv l is (l, -1)."""
        where: dict[str, tuple[int, int]] = {}
        for pos, nodes in enumerate(self.junctions):
            for k, name in enumerate(nodes):
                where[name] = (pos, k)
        for l, conv in enumerate(self.conv_nodes, start=1):
            where[conv] = (l, -1)
        return where

    # -- skips ---------------------------------------------------------------------------
    def _skips(self) -> list[Skip]:
        on_path = set(self.path)
        skips = []
        for pos, nodes in enumerate(self.junctions):
            for k, name in enumerate(nodes):
                if self.ops[name].kind is not Kind.ADD:
                    continue
                main = self.path[self.path.index(name) - 1]
                side = [a for a in _inputs(self.nodes[name]) if a.name != main]
                if len(side) != 1:  # x + x: both operands on the path
                    skips.append(Skip(name, pos, main, self.where[main][0], (), True))
                    continue
                skips.append(self._follow_shortcut(name, pos, side[0], on_path))
        return skips

    def _follow_shortcut(self, add: str, pos: int, start: fx.Node, on_path: set[str]) -> Skip:
        shortcut: list[str] = []
        cur, reason = start, ""
        while cur.name not in on_path:
            op = self.ops[cur.name]
            ins = _inputs(cur)
            if op.kind not in (Kind.CONV, Kind.NORM, Kind.IDENTITY) or len(ins) != 1:
                reason = reason or f"shortcut holds {op.reason or op.kind.value}"
            elif op.kind is Kind.CONV and self.modules[str(cur.target)].padding[0] != 0:
                reason = reason or "shortcut conv with padding"
            if len(cur.users) != 1:
                reason = reason or f"shortcut value {cur.name} is used elsewhere"
            if not ins:
                return Skip(add, pos, cur.name, -1, tuple(shortcut), False, reason or "shortcut from no input")
            shortcut.insert(0, cur.name)
            cur = ins[0]
        return Skip(add, pos, cur.name, self.where[cur.name][0], tuple(shortcut), not reason, reason)

    # -- layers and positions --------------------------------------------------------------
    def _layers(self) -> list[Layer]:
        layers = []
        for l, name in enumerate(self.conv_nodes, start=1):
            node = self.nodes[name]
            conv = self.modules[str(node.target)]
            in_shape = self.cap.shapes[_inputs(node)[0].name]
            out_shape = self.cap.shapes[name]
            layers.append(Layer(
                index=l, name=str(node.target), node=name,
                in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel=conv.kernel_size[0], stride=conv.stride[0], padding=conv.padding[0],
                groups=conv.groups, in_shape=in_shape, out_shape=out_shape,
                irreducible=in_shape != out_shape,
                weight_l1=float(conv.weight.detach().abs().sum()),
                norm=self._norm_of(l),
            ))
        return layers

    def _norm_of(self, l: int) -> str | None:
        """The BatchNorm right after conv l (through identities), which goes with it."""
        for name in self.junctions[l]:
            kind = self.ops[name].kind
            if kind is Kind.NORM and len(self.nodes[name].users) == 1:
                return name
            if kind is not Kind.IDENTITY or len(self.nodes[name].users) != 1:
                return None
        return None

    def _positions(self) -> list[Position]:
        L = len(self.conv_nodes)
        skip_users = self._skip_first_users()
        positions = []
        for pos, nodes in enumerate(self.junctions):
            head = self.conv_nodes[pos - 1] if pos else None
            cut_k = next((k for k, n in enumerate(nodes) if self.ops[n].kind not in LINEAR_KINDS), len(nodes))
            values = ([head] if head else []) + nodes[: len(nodes) - (pos == L)]
            entry = nodes[-1] if nodes else head
            cut = nodes[cut_k - 1] if cut_k > 0 else (head or entry)
            acts = [n for n in nodes if self.ops[n].kind is Kind.ACT]
            forced = self._forced_reason(pos, nodes, values, acts, skip_users)
            act = acts[0] if len(acts) == 1 else None
            positions.append(Position(
                index=pos, nodes=tuple(nodes), cut=cut, entry=entry, activation=act,
                activation_type=self._act_type(act) if act else None, forced=forced,
            ))
        return positions

    def _skip_first_users(self) -> dict[str, set[str]]:
        """For each skip source: the nodes that legitimately read it (shortcut start or add)."""
        users: dict[str, set[str]] = {}
        for s in self.skips:
            users.setdefault(s.source, set()).add(s.shortcut[0] if s.shortcut else s.add)
        return users

    def _forced_reason(self, pos: int, nodes: list[str], values: list[str], acts: list[str],
                       skip_users: dict[str, set[str]]) -> str:
        if pos == 0:
            return "chain start"
        if pos == len(self.conv_nodes):
            return "chain end"
        barrier = next((self.ops[n].reason for n in nodes if self.ops[n].kind is Kind.BARRIER), "")
        if barrier:
            return barrier
        if len(acts) > 1:
            return "two activations"
        for name in values:
            nxt = self.path[self.path.index(name) + 1]
            for user in self.nodes[name].users:
                if user.name != nxt and user.name not in skip_users.get(name, ()):
                    return f"{name} is also used by {user.name}"
        return ""

    def _act_type(self, node_name: str) -> str:
        node = self.nodes[node_name]
        if node.op == "call_module":
            return type(self.modules[str(node.target)]).__name__
        return getattr(node.target, "__name__", str(node.target))

    # -- segments ----------------------------------------------------------------------
    def skip_role(self, skip: Skip, i: int, j: int) -> str:
        """How segment (i, j] relates to ``skip``: outside, fold, end, or illegal."""
        a, b = skip.source_position, skip.position
        pos_j = self.positions[j]
        cut_k = self._index_in(j, pos_j.cut)
        add_k = self.where[skip.add][1]
        src_k = self.where.get(skip.source, (a, -2))[1]
        add_inside = i < b < j or (b == j and add_k <= cut_k)
        if add_inside:
            src_inside = i < a < j or (a == j and src_k < add_k) or (a == i and self._is_entry(skip.source, i))
            if src_inside and skip.foldable:
                return "fold"
            # An unfoldable shortcut (e.g. one that holds another add) that reads the segment
            # input is left as it is, like one from outside: the segment ends on the add's
            # main operand. From inside the segment it would read a value that merging removes.
            from_input = a == i and self._is_entry(skip.source, i)
            return "end" if b == j and (not src_inside or from_input) else "illegal"
        add_after = b > j or (b == j and add_k > cut_k)
        if add_after and (i < a < j or (a == j and src_k < cut_k)):
            return "illegal"
        return "outside"

    def _index_in(self, pos: int, name: str) -> int:
        return self.where[name][1] if self.where.get(name, (None,))[0] == pos else -1

    def _is_entry(self, name: str, pos: int) -> bool:
        """Whether ``name`` carries the value a segment starting at ``pos`` reads."""
        entry = self.positions[pos].entry
        if name == entry:
            return True
        nodes = self.positions[pos].nodes
        if name not in nodes or entry not in nodes:
            return False
        between = nodes[nodes.index(name) + 1: nodes.index(entry) + 1]
        return all(self.ops[n].kind is Kind.IDENTITY for n in between)

    def why_illegal(self, i: int, j: int) -> str:
        """Reason no segment (i, j] exists, or "" if the pair is structurally legal."""
        L = len(self.conv_nodes)
        if not 0 <= i < j <= L:
            return f"need 0 <= i < j <= L={L}"
        inner = [p for p in range(i + 1, j) if self.positions[p].forced]
        if inner:
            return f"position {inner[0]} is a forced boundary ({self.positions[inner[0]].forced})"
        for skip in self.skips:
            role = self.skip_role(skip, i, j)
            if role == "illegal":
                why = skip.reason or "the segment holds only part of the residual branch"
                return f"it crosses the residual add {skip.add} ({why})"
        if self._kernel_options(i, j) == {}:
            return self._stride_reason(i, j)
        return ""

    def _stride_reason(self, i: int, j: int) -> str:
        return "a strided conv would be merged with a following irreducible conv of kernel > 1"

    def _kernel_options(self, i: int, j: int) -> dict[int, tuple[float, tuple[int, ...]]]:
        """Eq. 3: for each reachable merged kernel, the kept convs with the largest L1 norm."""
        options: dict[int, tuple[float, tuple[int, ...]]] = {1: (0.0, ())}
        stride = 1
        for l in range(i + 1, j + 1):
            layer = self.layers[l - 1]
            grow = layer.kernel - 1
            allowed = may_keep(layer.kernel, stride)
            nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
            for k, (w, kept) in options.items():
                if not layer.irreducible:
                    _better(nxt, k, (w, kept))
                if allowed:
                    _better(nxt, k + grow, (w + layer.weight_l1, kept + (l,)))
            options = nxt
            stride *= layer.stride
            if not options:
                return {}
        return options

    def all_segments(self, max_kernel: int | None) -> Iterator[Segment]:
        L = len(self.conv_nodes)
        for i in range(L):
            for j in range(i + 1, L + 1):
                if j > i + 1 and self.positions[j - 1].forced:
                    break  # every longer segment from i crosses this boundary too
                if self.why_illegal(i, j):
                    continue
                for k, (_, kept) in sorted(self._kernel_options(i, j).items()):
                    if max_kernel is None or k <= max_kernel:
                        yield self.segment(i, j, k, kept)

    def segment(self, i: int, j: int, k: int, kept: tuple[int, ...]) -> Segment:
        stride, padding = 1, 0
        groups = self.cap.shapes[self.positions[i].entry][1]
        for l in kept:
            layer = self.layers[l - 1]
            padding += layer.padding * stride
            stride *= layer.stride
            groups = math.gcd(groups, layer.groups)
        stride = 1
        for l in range(i + 1, j + 1):
            stride *= self.layers[l - 1].stride
        folds = [s for s in self.skips if self.skip_role(s, i, j) == "fold"]
        for s in folds:
            for name in s.shortcut:
                if self.ops[name].kind is Kind.CONV:
                    groups = math.gcd(groups, self.modules[str(self.nodes[name].target)].groups)
        kept_norms = [n for n in self._region_nodes(i, j) if self.ops[n].kind is Kind.NORM
                      and n not in {self.layers[l - 1].norm for l in range(i + 1, j + 1)}]
        end = self.positions[j]
        in_shape = self.cap.shapes[self.positions[i].entry]
        trim = unreachable_taps(k, padding, stride, max(in_shape[2:]))
        return Segment(
            i=i, j=j, k=k, convs=kept,
            in_shape=in_shape,
            out_shape=self.cap.shapes[end.cut],
            stride=stride, padding=padding - trim, groups=groups,
            identity=not kept and not folds and not kept_norms,
            kernel=k - 2 * trim,
            activation=end.activation_type,
        )

    def _region_nodes(self, i: int, j: int) -> list[str]:
        """Main-path nodes a segment (i, j] spans, up to position j's cut."""
        nodes: list[str] = []
        for l in range(i + 1, j + 1):
            nodes.append(self.conv_nodes[l - 1])
            junction = self.junctions[l]
            if l < j:
                nodes += junction
            else:
                cut = self.positions[j].cut
                nodes += junction[: junction.index(cut) + 1] if cut in junction else []
        return nodes


def _better(table: dict, k: int, cand: tuple[float, tuple[int, ...]]) -> None:
    if k not in table or cand[0] > table[k][0]:
        table[k] = cand


_METADATA_ATTRS = frozenset({"shape", "dtype", "device"})


def _value_descendants(start: fx.Node) -> set[fx.Node]:
    """Nodes whose value depends on ``start``'s value (reading its shape/dtype/device does not count)."""
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        for user in node.users:
            metadata = (user.op == "call_function" and user.target is getattr and user.args[1] in _METADATA_ATTRS) or (
                user.op == "call_method" and user.target in ("size", "dim"))
            if user not in seen and not metadata:
                seen.add(user)
                stack.append(user)
    return seen


def _inputs(node: fx.Node) -> list[fx.Node]:
    """Graph nodes a node reads, in argument order, without duplicates."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n not in found else None)
    return [n for n in found if n.op != "get_attr"]
