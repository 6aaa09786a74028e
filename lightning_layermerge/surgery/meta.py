"""The record a pruned or merged network carries: ``gm.meta["layermerge"]``, read and written only here.

``prune`` writes it, ``merge`` reads the regions and marks the network merged, the Lightning
callback records the example-input shapes, and ``save_compressed`` stores it in the file header
(JSON), so its stored form is plain data. :class:`SurgeryMeta` is the typed view of that record::

    {"plan": Plan.to_dict(), "regions": [MergeRegion.to_dict(), ...], "merged": bool,
     "inputs": [[shape, dtype], ...]  (only once recorded)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .capture import ExampleInput, as_args

__all__ = ["META_KEY", "InputSpec", "MergeRegion", "SurgeryMeta", "attach_input_spec", "example_from_spec",
           "input_spec"]

#: Key of the record in ``fx.GraphModule.meta``.
META_KEY = "layermerge"

#: Shapes and dtypes of a trace's tensor arguments: ``[(shape, dtype name), ...]``.
InputSpec = list[tuple[list[int], str]]


@dataclass(frozen=True)
class MergeRegion:
    """Where one segment lives in a pruned graph: ``merge`` replaces ``entry -> output`` by one conv.

    Attributes:
        i / j / k: The segment ``(i, j]`` and its merged kernel size.
        convs: The chain convs the segment keeps.
        entry: Name of the node whose value the segment reads.
        output: Name of the node whose value the merged conv produces.
        padding: Total zero padding moved to the entry (0 if none was moved).
        channels: Channels of the entry's value.
        in_hw: Spatial size of the entry's value.
    """

    i: int
    j: int
    k: int
    convs: tuple[int, ...]
    entry: str
    output: str
    padding: int
    channels: int
    in_hw: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """The stored (JSON) form."""
        return {**asdict(self), "convs": list(self.convs), "in_hw": list(self.in_hw)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergeRegion:
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["i"]), int(data["j"]), int(data["k"]), tuple(data["convs"]), str(data["entry"]),
                   str(data["output"]), int(data["padding"]), int(data["channels"]), tuple(data["in_hw"]))

    def renamed(self, rename: Mapping[str, str]) -> MergeRegion:
        """The region with its node names mapped through ``rename`` (a graph rebuilt from a file)."""
        return MergeRegion(self.i, self.j, self.k, self.convs, rename[self.entry], rename[self.output],
                           self.padding, self.channels, self.in_hw)


@dataclass
class SurgeryMeta:
    """The typed view of ``gm.meta["layermerge"]`` (see the module docstring for the stored form).

    Attributes:
        plan: The plan, as ``Plan.to_dict()``.
        regions: One per segment, for ``merge`` (empty once merged is all that matters).
        merged: Whether ``merge`` has run.
        inputs: The example-input shapes the plan was traced with, once recorded.
    """

    plan: dict[str, Any]
    regions: list[MergeRegion] = field(default_factory=list)
    merged: bool = False
    inputs: InputSpec | None = None

    @staticmethod
    def present(model: object) -> bool:
        """Whether ``model`` is a network made by ``prune`` (and possibly ``merge``)."""
        meta = getattr(model, "meta", None)
        return isinstance(model, fx.GraphModule) and isinstance(meta, dict) and META_KEY in meta

    @classmethod
    def of(cls, model: nn.Module) -> SurgeryMeta:
        """The record of ``model``.

        Raises:
            TypeError: ``model`` was not made by ``prune``/``merge``.
        """
        if not cls.present(model):
            raise TypeError(
                f"expected a network returned by lightning_layermerge.prune(...) or merge(...), got "
                f"{type(model).__name__}; after LayerMergeCallback, pass the compressed submodule (e.g. module.model)"
            )
        return cls.from_dict(model.meta[META_KEY])

    def write(self, model: fx.GraphModule) -> None:
        """Store this record on ``model`` (replacing any earlier one)."""
        model.meta[META_KEY] = self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """The stored form (plain data: it goes into file headers as JSON)."""
        data: dict[str, Any] = {"regions": [r.to_dict() for r in self.regions], "plan": self.plan,
                                "merged": self.merged}
        if self.inputs is not None:
            data["inputs"] = [(list(shape), dtype) for shape, dtype in self.inputs]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SurgeryMeta:
        """Inverse of :meth:`to_dict` (also reads records saved before ``inputs`` existed)."""
        inputs = data.get("inputs")
        return cls(plan=dict(data["plan"]), regions=[MergeRegion.from_dict(r) for r in data.get("regions", [])],
                   merged=bool(data.get("merged", False)),
                   inputs=[(list(shape), str(dtype)) for shape, dtype in inputs] if inputs else None)


def input_spec(example: ExampleInput) -> InputSpec:
    """Shapes and dtypes of the tensor arguments of ``example`` (what a trace depends on).

    Raises:
        TypeError: an argument is not a tensor (it cannot be recreated from a spec).
    """
    spec = []
    for arg in as_args(example):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"cannot record a non-tensor example argument ({type(arg).__name__}); pass tensors only")
        spec.append((list(arg.shape), str(arg.dtype).removeprefix("torch.")))
    return spec


def example_from_spec(spec: Sequence[Sequence[Any]]) -> tuple[torch.Tensor, ...]:
    """Zero tensors with the recorded shapes and dtypes (enough to trace; values do not matter)."""
    return tuple(torch.zeros(tuple(shape), dtype=getattr(torch, dtype)) for shape, dtype in spec)


def attach_input_spec(model: fx.GraphModule, example: ExampleInput) -> None:
    """Record ``example``'s shapes on ``model`` so ``save_compressed`` and a later rebuild can use them.

    Raises:
        TypeError: ``model`` was not made by ``prune``/``merge``, or ``example`` holds a non-tensor.
    """
    meta = SurgeryMeta.of(model)
    meta.inputs = input_spec(example)
    meta.write(model)
