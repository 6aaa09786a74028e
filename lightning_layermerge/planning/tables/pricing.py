"""From timings to table prices: in-context scaling and residual additions (torch only).

A segment timed alone is not the segment inside the network; these functions turn the alone
timings and one node-by-node pass over the BN-folded original into entries whose sums are the
network's latency: :func:`in_context` scales each entry by the in-place / alone time of the
layers it replaces, :func:`with_skip_costs` prices each residual addition (and its shortcut)
with the segments that keep it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ...surgery.graph import Chain, Segment
from ...surgery.plan import Plan

__all__ = ["in_context", "in_context_additive", "in_context_fitted", "skip_costs", "with_skip_costs"]

Key = tuple[int, int, int]


def _in_place_layers(chain: Chain, nodes: dict[str, float]) -> dict[int, float]:
    """ms of every chain layer (its merged conv + its activation) timed in place in the BN-folded original."""
    out = {}
    for seg in Plan.keep_all(chain).segments:
        conv = nodes.get(f"merged_{seg.i}_{seg.j}")
        if conv is None:
            continue
        act = chain.positions[seg.j].activation
        out[seg.j] = conv + (nodes.get(act, 0.0) if act is not None else 0.0)
    return out


def in_context(chain: Chain, alone: dict[Key, float], in_place: dict[int, float]) -> dict[Key, float]:
    """Entries scaled from "timed alone" to "inside the network".

    Entry ``(i, j, k)`` is multiplied by ``sum(in_place[l]) / sum(alone[keep-all l])`` over the
    layers ``l = i+1..j`` it replaces; layers without an in-place time count as factor 1.

    Args:
        chain: The chain.
        alone: Entries timed alone (``(i, j, k) -> ms``).
        in_place: Chain layer ``l`` -> its conv + activation timed in place (ms).

    Returns:
        The scaled entries (a bare identity segment stays 0; one that keeps its activation is
        scaled like the layers it replaces).
    """
    alone_layer = {s.j: alone[s.key] for s in Plan.keep_all(chain).segments}
    placed = {l: in_place.get(l, alone_layer[l]) for l in alone_layer}
    cum_alone, cum_placed = [0.0], [0.0]
    for l in range(1, chain.num_layers + 1):
        cum_alone.append(cum_alone[-1] + alone_layer.get(l, 0.0))
        cum_placed.append(cum_placed[-1] + placed.get(l, 0.0))
    out = {}
    for key, ms in alone.items():
        i, j, _ = key
        denominator = cum_alone[j] - cum_alone[i]
        out[key] = ms * (cum_placed[j] - cum_placed[i]) / denominator if denominator > 0 else ms
    return out


def _scaled_to(nodes: dict[str, float], total_ms: float) -> dict[str, float]:
    """Node times rescaled so that they add up to the whole network's time.

    Timing every operation on its own adds a clock read and an interpreter step per node
    (a few microseconds each, up to 5 % of a small network), which the whole forward pass
    does not pay; without the rescaling the in-place chain alone would exceed ``total_ms`` and
    the operations outside it would be priced at nothing.
    """
    measured = sum(nodes.values())
    if measured <= 0 or not math.isfinite(total_ms) or total_ms <= 0:
        return nodes
    return {name: ms * total_ms / measured for name, ms in nodes.items()}


def skip_costs(chain: Chain, nodes: dict[str, float]) -> list[float]:
    """In-place ms of every residual addition with its shortcut (projection conv, norm, ...).

    Args:
        chain: The chain; one cost per ``chain.skips`` entry, in order.
        nodes: Node name -> in-place ms in the BN-folded original (:func:`time_nodes`); an
            operation that is not there (already folded into a conv) costs 0.
    """
    return [nodes.get(skip.add, 0.0) + sum(nodes.get(n, 0.0) for n in skip.shortcut) for skip in chain.skips]


def with_skip_costs(chain: Chain, entries: dict[Key, float], costs: Sequence[float]) -> dict[Key, float]:
    """Entries that carry the residual additions (and shortcuts) their segments keep or remove.

    A segment that spans a whole residual block folds its addition and shortcut projection
    into the merged conv, so a plan of such segments runs without them; a table that leaves
    them in the constant ``outside_ms`` prices those plans too high (measured: up to 10 % of
    the original's latency on small ResNets). Two exact, additive ways to move a skip's cost
    ``c`` out of the constant part:

    * when the keep-all layer ending at the skip's position holds the addition (role
      ``"end"``), every plan has exactly one segment that holds it, ending there (keeps it)
      or spanning it (folds it): ``c`` is added to every ``"end"`` entry and leaves
      ``outside_ms``;
    * otherwise (the addition lies after that layer's cut) ``c`` stays in ``outside_ms`` and
      is subtracted from the entries that fold it, floored at 0 (a merged conv is dearer
      than the addition it absorbs in every network measured so far).

    Args:
        chain: The chain.
        entries: ``(i, j, k) -> ms`` (alone or in context).
        costs: One in-place cost per ``chain.skips`` entry (:func:`skip_costs`).

    Returns:
        The entries with the skips' costs moved as described.
    """
    analysis = chain.analysis
    out = dict(entries)
    segments = {s.key: s for s in chain.segments}
    for skip, cost in zip(chain.skips, costs):
        if cost <= 0:
            continue
        b = skip.position
        additive = analysis.skip_role(skip, b - 1, b) == "end"
        for key, ms in out.items():
            seg = segments[key]
            role = analysis.skip_role(skip, seg.i, seg.j)
            if additive and role == "end":
                out[key] = ms + cost
            elif not additive and role == "fold":
                out[key] = max(ms - cost, 0.0)
    return out


def in_context_additive(chain: Chain, alone: dict[Key, float], in_place: dict[int, float]) -> dict[Key, float]:
    """Entries moved from "timed alone" to "inside the network" by an additive correction.

    Where timing a segment alone adds a roughly fixed cost at its input and output (an ONNX
    Runtime session converts its input to its blocked layout and its output back; inside the
    whole network this happens once), scaling by a factor misprices merged segments: a merged
    dense conv that replaces cheap depthwise layers would inherit their large overhead share.
    Here each original layer's difference ``in_place[l] - alone[l]`` is split between its input
    and its output in proportion to their sizes, and a segment ``(i, j]`` gets the input part of
    layer ``i+1`` and the output part of layer ``j``: the keep-all layers come out at exactly
    their in-place time. Identity segments are scaled as in :func:`in_context`. Entries are
    floored as in :func:`_with_end_corrections`.

    Args:
        chain: The chain.
        alone: Entries timed alone (``(i, j, k) -> ms``).
        in_place: Chain layer ``l`` -> its time in place (ms); missing layers count as alone.

    Returns:
        The corrected entries.
    """
    return _with_end_corrections(chain, alone, in_place, _excess(chain, alone, in_place))


def _overhead_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``overhead = fixed + per_element * elements`` with both terms at least 0."""
    n = len(points)
    if n == 0:
        return 0.0, 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x if var_x > 0 else 0.0
    if slope <= 0:
        return max(mean_y, 0.0), 0.0
    fixed = mean_y - slope * mean_x
    if fixed < 0:  # through the origin instead
        sum_xx = sum(x * x for x, _ in points)
        return 0.0, max(sum(x * y for x, y in points) / sum_xx, 0.0) if sum_xx > 0 else 0.0
    return fixed, slope


def in_context_fitted(chain: Chain, alone: dict[Key, float], in_place: dict[int, float]) -> dict[Key, float]:
    """Entries moved from "timed alone" to "inside the network" by a fitted per-session overhead.

    A segment timed in its own ONNX Runtime session pays what it would not pay inside the
    network: a fixed cost (the layout reorders at its input and output are kernels of their own,
    each dispatched to the threads) and a cost per element moved. Both are fitted by least
    squares to the original layers' ``alone - in_place`` against their input + output sizes;
    every segment ``(i, j]`` is then priced ``alone - (fixed + per_element * its sizes)`` minus
    the fit's residuals of layers ``i+1`` (input share) and ``j`` (output share), so the
    keep-all layers come out at exactly their in-place time. Unlike :func:`in_context_additive`,
    a merged segment loses the whole fixed cost, not the fraction of two layers' overheads that
    their tensor sizes assign to its ends (measured on the digits MobileNetV2 at 2 threads: the
    additive split left ~0.016 ms per merged block in, and its DP plan was priced 14 % high).
    Identity segments are scaled as in :func:`in_context`; entries are floored as in
    :func:`_with_end_corrections`.

    Args:
        chain: The chain.
        alone: Entries timed alone (``(i, j, k) -> ms``).
        in_place: Chain layer ``l`` -> its time in place (ms); missing layers count as alone.

    Returns:
        The corrected entries.
    """
    keep = {s.j: s for s in Plan.keep_all(chain).segments}
    excess = _excess(chain, alone, in_place)
    overhead = lambda l: -excess(l)  # noqa: E731  (what the layer's own session adds)
    fixed, per_element = _overhead_fit([(_elements(keep[l]), overhead(l)) for l in keep
                                        if not keep[l].identity and l in in_place])

    def residual(l: int) -> float:
        if keep[l].identity:  # not timed as a layer of its own: nothing to correct
            return 0.0
        return overhead(l) - (fixed + per_element * _elements(keep[l]))

    return _with_end_corrections(chain, alone, in_place, lambda l: -residual(l),
                                 whole=lambda seg: fixed + per_element * _elements(seg))


def _excess(chain: Chain, alone: dict[Key, float], in_place: dict[int, float]) -> Callable[[int], float]:
    """``l -> in_place[l] - alone[keep-all layer l]`` (0 for a layer without an in-place time)."""
    keep = {s.j: s for s in Plan.keep_all(chain).segments}
    return lambda l: in_place.get(l, alone[keep[l].key]) - alone[keep[l].key]


def _elements(seg: Segment) -> float:
    """Elements a segment reads and writes (input + output tensor sizes)."""
    return float(math.prod(seg.in_shape) + math.prod(seg.out_shape))


def _with_end_corrections(chain: Chain, alone: dict[Key, float], in_place: dict[int, float],
                          end: Callable[[int], float], whole: Callable[[Segment], float] = lambda seg: 0.0,
                          ) -> dict[Key, float]:
    """``alone - whole(seg)`` plus the input share of ``end(i+1)`` and the output share of ``end(j)``.

    The common form of the additive corrections: each original layer's correction ``end(l)``
    is split between its input and output in proportion to their sizes, and segment ``(i, j]``
    takes the input part of layer ``i+1`` and the output part of layer ``j``. Identity segments
    are scaled as in :func:`in_context`.

    A segment that computes is never priced below ``alone`` times half the smallest in-place /
    alone ratio of the original's own layers (:func:`_floor_ratio`): a correction fitted or split
    from a few noisy layers can exceed a small merged segment's whole alone time (seen on a
    2-layer network with ONNX Runtime under load), and a price of 0 would let the DP take that
    segment for free. Half, because a merged segment may legitimately keep a smaller share of
    its alone time than any single layer (it can be cheaper than the layers it replaces while
    its session pays the same fixed overhead); the floor is a guard against noise, not a model.
    """
    keep = {s.j: s for s in Plan.keep_all(chain).segments}
    scaled = in_context(chain, alone, in_place)
    floor = 0.5 * _floor_ratio(chain, alone, in_place)

    def share_in(l: int) -> float:
        seg = keep[l]
        size_in, size_out = math.prod(seg.in_shape), math.prod(seg.out_shape)
        return size_in / (size_in + size_out)

    segments = {s.key: s for s in chain.segments}
    out = {}
    for key, ms in alone.items():
        seg = segments[key]
        if seg.identity or ms <= 0:
            out[key] = scaled[key]
            continue
        ends = end(seg.i + 1) * share_in(seg.i + 1) + end(seg.j) * (1 - share_in(seg.j))
        out[key] = max(ms - whole(seg) + ends, floor * ms)
    return out


def _floor_ratio(chain: Chain, alone: dict[Key, float], in_place: dict[int, float]) -> float:
    """Smallest ``in_place / alone`` over the original's timed layers, capped at 1 (0 if none is timed)."""
    ratios = [in_place[s.j] / alone[s.key] for s in Plan.keep_all(chain).segments
              if not s.identity and s.j in in_place and alone.get(s.key, 0.0) > 0]
    return min(1.0, max(0.0, min(ratios))) if ratios else 0.0
