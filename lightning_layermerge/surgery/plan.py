"""A plan: a covering of positions 0..L by legal segments (kept activations A, kept convs C)."""

from __future__ import annotations

import random as _random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .chain import Chain, Segment

SegmentSpec = tuple[int, int, int] | tuple[int, int, int, Sequence[int]]


@dataclass(frozen=True)
class Plan:
    """Segments covering 0..L in order. Build with a ``Plan.from_*`` constructor."""

    segments: tuple[Segment, ...]
    num_layers: int
    fingerprint: str  # of the chain the plan was made for

    @classmethod
    def from_segments(cls, chain: Chain, specs: Iterable[SegmentSpec]) -> Plan:
        """Plan from ``(i, j, k)`` triples (kept convs by the paper's Eq. 3) or
        ``(i, j, k, convs)`` with explicit kept convs.

        Raises:
            ValueError: a segment is not legal, or the segments do not cover 0..L exactly.
        """
        segments = []
        for spec in specs:
            spec = tuple(spec)
            if len(spec) == 3:
                segments.append(chain.segment(*map(int, spec)))
            elif len(spec) == 4:
                i, j, k, convs = spec
                seg = chain.make_segment(int(i), int(j), tuple(int(c) for c in convs))
                if seg.k != k:
                    raise ValueError(f"segment ({i}, {j}] keeping convs {tuple(convs)} merges to kernel {seg.k}, not {k}")
                segments.append(seg)
            else:
                raise ValueError(f"a segment is (i, j, k) or (i, j, k, convs), got {spec!r}")
        _check_cover(segments, chain.num_layers)
        return cls(tuple(segments), chain.num_layers, chain.fingerprint)

    @classmethod
    def from_keep(cls, chain: Chain, activations: Iterable[int], convs: Iterable[int]) -> Plan:
        """Plan from the paper's sets: kept activations A ⊆ 1..L-1 and kept convs C ⊆ 1..L."""
        acts, kept = set(activations), set(convs)
        bad = sorted(a for a in acts if not 0 < a < chain.num_layers)
        if bad:
            raise ValueError(f"kept activations must lie in 1..L-1 = 1..{chain.num_layers - 1}, got {bad}")
        missing = sorted(chain.forced - {0, chain.num_layers} - acts)
        if missing:
            raise ValueError(f"positions {missing} are forced boundaries; their activations must be kept")
        bounds = [0, *sorted(acts), chain.num_layers]
        specs = []
        for i, j in zip(bounds, bounds[1:]):
            seg = chain.make_segment(i, j, tuple(c for c in kept if i < c <= j))
            specs.append((i, j, seg.k, seg.convs))
        return cls.from_segments(chain, specs)

    @classmethod
    def keep_all(cls, chain: Chain) -> Plan:
        """Every activation and conv kept: the original network (BatchNorm folded by merge)."""
        return cls.from_keep(chain, range(1, chain.num_layers), range(1, chain.num_layers + 1))

    @classmethod
    def replacing(cls, chain: Chain, segment: Segment | tuple[int, int, int]) -> Plan:
        """The original network with only ``segment`` replaced (the importance of Eq. 4)."""
        seg = segment if isinstance(segment, Segment) else chain.segment(*segment)
        specs: list[SegmentSpec] = [(l - 1, l, chain.layer(l).kernel, (l,)) for l in range(1, seg.i + 1)]
        specs.append((seg.i, seg.j, seg.k, seg.convs))
        specs += [(l - 1, l, chain.layer(l).kernel, (l,)) for l in range(seg.j + 1, chain.num_layers + 1)]
        return cls.from_segments(chain, specs)

    @classmethod
    def random(cls, chain: Chain, rng: _random.Random) -> Plan:
        """A uniformly random walk over legal segments from position 0 to L (tests, benchmarks)."""
        by_start: dict[int, list[Segment]] = {}
        for seg in chain.segments:
            by_start.setdefault(seg.i, []).append(seg)
        at, keys = 0, []
        while at < chain.num_layers:
            seg = rng.choice(by_start[at])
            keys.append(seg.key)
            at = seg.j
        return cls.from_segments(chain, keys)

    @classmethod
    def remove_all(cls, chain: Chain) -> Plan:
        """Everything removable removed: fewest segments, then the smallest kernels."""
        best: dict[int, tuple[tuple[int, int], list[Segment]]] = {0: ((0, 0), [])}
        for j in range(1, chain.num_layers + 1):
            options = []
            for i in range(j):
                if i not in best:
                    continue
                for seg in chain.segments_between(i, j):
                    (n, ksum), segs = best[i]
                    options.append(((n + 1, ksum + seg.k), segs + [seg]))
            if options:
                best[j] = min(options, key=lambda o: o[0])
        if chain.num_layers not in best:
            raise ValueError("the chain's legal segments do not cover 0..L")
        return cls(tuple(best[chain.num_layers][1]), chain.num_layers, chain.fingerprint)

    @property
    def kept_activations(self) -> frozenset[int]:
        """A: positions 1..L-1 whose activation is kept (segment boundaries)."""
        return frozenset(s.j for s in self.segments[:-1])

    @property
    def kept_convs(self) -> frozenset[int]:
        """C: chain convs that are kept."""
        return frozenset(c for s in self.segments for c in s.convs)

    @property
    def keys(self) -> list[tuple[int, int, int]]:
        """The plan as table keys (i, j, k)."""
        return [s.key for s in self.segments]

    def to_dict(self) -> dict:
        """JSON-able form (stored in checkpoints)."""
        return {"segments": [[s.i, s.j, s.k, list(s.convs)] for s in self.segments],
                "num_layers": self.num_layers, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, chain: Chain, data: dict) -> Plan:
        """Inverse of :meth:`to_dict`; checks the plan was made for this architecture."""
        if data.get("fingerprint") != chain.fingerprint:
            raise ValueError(
                "this plan was made for a different architecture or input shape "
                f"(fingerprint {data.get('fingerprint')} != {chain.fingerprint}); trace the same model "
                "with the same example input shape"
            )
        return cls.from_segments(chain, [(i, j, k, tuple(c)) for i, j, k, c in data["segments"]])

    def __str__(self) -> str:
        parts = [f"({s.i},{s.j}]k{s.k}" for s in self.segments]
        return f"Plan({len(self.segments)} segments, {len(self.kept_convs)}/{self.num_layers} convs: {' '.join(parts)})"


def _check_cover(segments: Sequence[Segment], num_layers: int) -> None:
    at = 0
    for seg in segments:
        if seg.i != at:
            what = "gap" if seg.i > at else "overlap"
            raise ValueError(
                f"the plan's segments must cover 0..L={num_layers} in order without gaps or overlaps: "
                f"{what} at position {at} (next segment starts at {seg.i})"
            )
        at = seg.j
    if at != num_layers:
        raise ValueError(f"the plan's segments must cover 0..L={num_layers}: they stop at position {at}")
