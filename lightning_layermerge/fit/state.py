"""The plan state of a compressed fit, as checkpoints store it: :class:`CompressionState`.

The callback writes it into every checkpoint (twice: Lightning's callback state and the top-level
``checkpoint["layermerge"]``) so that a resumed run, ``restore_pruned`` and ``rebuild_pruned`` can
rebuild the pruned architecture without planning again. Checkpoints hold its plain-dict form
(:meth:`CompressionState.to_dict`), which loads with ``torch.load(weights_only=True)``.

Versions: 1 is every state written so far, including those of the first callback (which lacked
``merged``, ``original_weights`` and the table facts; they read as unknown). A state from a newer
version is refused rather than half understood.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STATE_VERSION", "CompressionState"]

#: Version written into new states; :meth:`CompressionState.from_dict` reads this and older ones.
STATE_VERSION = 1


@dataclass
class CompressionState:
    """What a checkpoint of a compressed fit records about the compression.

    Attributes:
        plan: ``Plan.to_dict()`` of the plan applied.
        target: Attribute path of the compressed submodule (``None`` in a bare ``plan=`` dict).
        inputs: Example-input shapes the plan was traced with (``input_spec``).
        budget / method: The callback's settings the plan was made with.
        merged: Whether the checkpoint's weights are those of the merged network.
        original_weights: Fingerprint of the original target's weights (``weights_fingerprint``).
        predicted_ms / table_original_ms: The latency table's prediction for the plan and the
            original network's measured total.
        metric_before / monitor / mode / training_loss: The Perf metric and its value before compression.
        calibration: One record per calibration round.
        importance: Noise level of the importance table (``NoiseLevel.as_dict()``) and
            ``paired_offset``, the ln I offset its entries were read relative to (None: as they are).
        latency_settings: The settings the table was really measured with (``asdict(LatencySettings)``).
        table_build_s / table_max_spread / table_unreliable / load_note: Facts about the latency
            table's build (``table_unreliable``: timings left above the spread limit).
        extra: Keys this version does not know (kept, so that a round trip loses nothing).
        version: The state version (:data:`STATE_VERSION`).
    """

    plan: dict[str, Any]
    target: str | None = None
    inputs: list | None = None
    budget: float | None = None
    method: str | None = None
    merged: bool = False
    original_weights: str | None = None
    predicted_ms: float | None = None
    table_original_ms: float | None = None
    metric_before: float | None = None
    monitor: str | None = None
    mode: str | None = None
    training_loss: bool = False
    calibration: list[dict[str, Any]] = field(default_factory=list)
    importance: dict[str, Any] | None = None
    latency_settings: dict[str, Any] | None = None
    table_build_s: float | None = None
    table_max_spread: float | None = None
    table_unreliable: int | None = None
    load_note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The plain-dict form checkpoints store (unknown keys of :attr:`extra` included)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionState:
        """Read a stored state: any version up to :data:`STATE_VERSION` (a state without a
        ``version``, e.g. a bare ``{"plan": ...}``, is read as version 1).

        Raises:
            ValueError: It has no ``plan``, or was written by a newer version of this package.
        """
        version = data.get("version", 1)
        if not isinstance(version, int) or version > STATE_VERSION:
            raise ValueError(f"the LayerMerge state has version {version!r}, newer than this lightning_layermerge "
                             f"reads ({STATE_VERSION}); upgrade lightning_layermerge to load it")
        if "plan" not in data:
            raise ValueError("the LayerMerge state holds no plan")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        values.update(plan=dict(data["plan"]), version=STATE_VERSION,
                      calibration=list(data.get("calibration") or []), load_note=data.get("load_note") or "")
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def updated(self, other: CompressionState | Mapping[str, Any]) -> CompressionState:
        """This state with the entries ``other`` holds replacing its own (a checkpoint's state
        merged into the callback's)."""
        theirs = other.to_dict() if isinstance(other, CompressionState) else dict(other)
        return CompressionState.from_dict({**self.to_dict(), **theirs})
