"""The chain model of a network: the public data :func:`~lightning_layermerge.trace` returns.

A network is read as the paper's chain of ``L`` convolutions (layers 1..L on its main path)
with a *position* (junction) between consecutive ones; a *segment* ``(i, j, k)`` replaces
layers ``i+1..j`` by one merged conv of kernel size ``k``. :class:`Chain` holds the layers,
positions, residual skips and every legal segment; how they are found from the captured graph
is :mod:`lightning_layermerge.surgery.analysis`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .capture import Capture

if TYPE_CHECKING:
    from .analysis import ChainAnalysis

__all__ = ["Chain", "Layer", "Position", "Segment", "Skip", "may_keep"]


def may_keep(kernel: int, stride_before: int) -> bool:
    """The paper's strided-conv rule: may a segment keep a conv of ``kernel`` when the convs
    before it in the segment stride by ``stride_before`` in all?

    Within a segment, only 1x1 convs may be kept after a strided conv (a larger one needs the
    activation before it kept, which ends the segment there). So keeping a conv grows the
    merged kernel by exactly ``kernel - 1``. Used both to enumerate the legal segments of a
    chain and to check a segment given by hand.
    """
    return kernel == 1 or stride_before == 1


@dataclass(frozen=True)
class Layer:
    """Chain convolution number ``index`` (1-based)."""

    index: int
    name: str
    node: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    irreducible: bool
    weight_l1: float
    norm: str | None  # node name of the BatchNorm that belongs to this conv


@dataclass(frozen=True)
class Position:
    """Position ``index`` (0..L): the junction after conv ``index`` and before the next."""

    index: int
    nodes: tuple[str, ...]  # junction nodes in path order (conv ``index`` excluded)
    cut: str  # value a segment ending here produces (before the activation)
    entry: str  # value a segment starting here reads (input of conv index+1)
    activation: str | None  # node name of the removable activation, if any
    activation_type: str | None
    forced: str  # why this position is always a boundary ("" if it is not)


@dataclass(frozen=True)
class Skip:
    """A residual addition ``add`` at position ``position`` fed from ``source``."""

    add: str
    position: int
    source: str
    source_position: int
    shortcut: tuple[str, ...]  # nodes between source and add (projection conv, norm, ...)
    foldable: bool
    reason: str = ""


@dataclass(frozen=True)
class Segment:
    """A legal merged layer: positions (i, j], merged kernel k, kept chain convs ``convs``.

    The remaining fields describe the single module ``merge`` produces for it, so that a
    latency table can time exactly that module.
    """

    i: int
    j: int
    k: int
    convs: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    stride: int
    padding: int  # of the merged conv, after trimming (see ``kernel``)
    groups: int
    identity: bool  # merges to no operation at all
    kernel: int  # of the merged conv: k, less taps that can only read zero padding
    activation: str | None  # type name of the activation that ends the segment

    @property
    def key(self) -> tuple[int, int, int]:
        """The table key (i, j, k)."""
        return (self.i, self.j, self.k)


@dataclass
class Chain:
    """The chain model of a network. Build with :func:`trace`; the model is not modified."""

    layers: list[Layer]
    positions: list[Position]
    skips: list[Skip]
    segments: list[Segment]
    model_name: str
    input_shapes: tuple[tuple[int, ...], ...]
    capture: Capture = field(repr=False)
    example: tuple = field(repr=False, default=())  # the positional example arguments

    @property
    def num_layers(self) -> int:
        """L: the number of convolutions on the chain."""
        return len(self.layers)

    @property
    def irreducible(self) -> frozenset[int]:
        """R: layers whose input and output shapes differ; never removed."""
        return frozenset(layer.index for layer in self.layers if layer.irreducible)

    @property
    def forced(self) -> frozenset[int]:
        """Positions that are boundaries in every plan (activation always kept)."""
        return frozenset(p.index for p in self.positions if p.forced)

    def layer(self, index: int) -> Layer:
        """Chain conv number ``index`` (1-based)."""
        return self.layers[index - 1]

    def segment(self, i: int, j: int, k: int) -> Segment:
        """The legal segment (i, j, k); ``ValueError`` naming the legal kernels if absent."""
        found = self._by_key.get((i, j, k))
        if found is None:
            kernels = sorted(s.k for s in self.segments if (s.i, s.j) == (i, j))
            why = f"legal kernels for ({i}, {j}] are {kernels}" if kernels else self.why_illegal(i, j)
            raise ValueError(f"segment ({i}, {j}, k={k}) is not a legal segment of this chain: {why}")
        return found

    def segments_between(self, i: int, j: int) -> list[Segment]:
        """All legal segments (i, j, *)."""
        return [s for s in self.segments if (s.i, s.j) == (i, j)]

    def why_illegal(self, i: int, j: int) -> str:
        """Human-readable reason why no segment (i, j] exists ("" if some does)."""
        return self.analysis.why_illegal(i, j)

    def all_kept_kernels(self) -> dict[tuple[int, int], int]:
        """(i, j) -> k of the segments that keep every conv in (i, j] (the Depth baseline)."""
        return {(s.i, s.j): s.k for s in self.segments if s.convs == tuple(range(s.i + 1, s.j + 1))}

    def make_segment(self, i: int, j: int, convs: tuple[int, ...]) -> Segment:
        """The segment (i, j] that keeps exactly the chain convs ``convs``.

        Raises:
            ValueError: (i, j] is not legal, ``convs`` drops an irreducible conv, holds a conv
                outside (i, j], or breaks the strided-conv rule.
        """
        why = self.why_illegal(i, j)
        if why:
            raise ValueError(f"segment ({i}, {j}] is not legal: {why}")
        convs = tuple(sorted(set(convs)))
        outside = [l for l in convs if not i < l <= j]
        if outside:
            raise ValueError(f"segment ({i}, {j}] cannot keep conv(s) {outside}: they lie outside it")
        dropped = sorted(self.irreducible.intersection(range(i + 1, j + 1)) - set(convs))
        if dropped:
            names = ", ".join(f"{l} ({self.layer(l).name})" for l in dropped)
            raise ValueError(
                f"segment ({i}, {j}] removes irreducible conv(s) {names}: their input and output "
                "shapes differ, so they can never be removed"
            )
        k, stride = 1, 1
        for l in range(i + 1, j + 1):
            layer = self.layer(l)
            if l in convs:
                if not may_keep(layer.kernel, stride):
                    raise ValueError(
                        f"segment ({i}, {j}] keeps conv {l} (kernel {layer.kernel}) after a strided conv; "
                        "the activation before it must be kept (paper's strided-conv rule)"
                    )
                k += layer.kernel - 1
            stride *= layer.stride
        return self.analysis.segment(i, j, k, convs)

    @property
    def analysis(self) -> ChainAnalysis:
        """The graph analysis behind this chain (computed once)."""
        if self._analysis is None:
            from .analysis import ChainAnalysis  # the analysis builds the data classes of this module

            self._analysis = ChainAnalysis(self.capture, self.model_name)
        return self._analysis

    @property
    def fingerprint(self) -> str:
        """Hash of the architecture (chain layers, positions, legal segments and input shape)."""
        parts = [self.model_name, self.input_shapes]
        parts += [(l.name, l.in_shape, l.out_shape, l.kernel, l.stride, l.padding, l.groups) for l in self.layers]
        parts += [(p.index, p.activation_type, p.forced) for p in self.positions]
        parts += [s.key for s in self.segments]
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def __post_init__(self) -> None:
        self._by_key = {s.key: s for s in self.segments}
        self._analysis: ChainAnalysis | None = None

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """The chain as a readable text table, one row per layer."""
        head = f"{'layer':>5}  {'module':<32} {'kernel':>6} {'stride':>6} {'channels':>11}  {'activation':<12} {'irred.':<6} barrier"
        rows = [f"{self.model_name}: L={self.num_layers}, {len(self.segments)} legal segments, "
                f"{len(self.irreducible)} irreducible, {len(self.forced) - 2} forced boundaries", head]
        for layer in self.layers:
            pos = self.positions[layer.index]
            act = pos.activation_type or "-"
            chans = f"{layer.in_channels}->{layer.out_channels}"
            rows.append(
                f"{layer.index:>5}  {layer.name[:32]:<32} {layer.kernel:>6} {layer.stride:>6} {chans:>11}  "
                f"{act[:12]:<12} {'yes' if layer.irreducible else 'no':<6} {pos.forced or '-'}"
            )
        return "\n".join(rows)

