"""A compressed ``UNet2DModel`` that is a diffusers model: :class:`LayerMergeUNet2DModel`.

``prune`` and ``merge`` return a ``torch.fx.GraphModule`` with the UNet's call signature and
output type, but diffusers pipelines also read ``unet.config`` (``sample_size``,
``in_channels``), ``unet.dtype`` and ``unet.device``, and share models with
``save_pretrained`` / ``from_pretrained``. :class:`LayerMergeUNet2DModel` is a
``ModelMixin`` + ``ConfigMixin`` that holds the compressed network (as ``.network``) and
whose config is

* the original ``UNet2DModel`` config, key for key (so ``unet.config.sample_size`` works), and
* ``layermerge``: ``{"kind": "pruned" | "merged", "plan": Plan.to_dict(), "inputs": the
  example-input shapes the plan was traced with}``.

``from_pretrained`` therefore needs no pickled code: it rebuilds the architecture
(``UNet2DModel(**config)`` -> ``trace`` -> ``prune(plan)`` -> ``merge`` for a merged one) and
loads the saved safetensors weights into it::

    from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler
    from lightning_layermerge import LayerMergeUNet2DModel, merge, prune, trace

    chain = trace(unet, (x, t))
    merged = merge(prune(unet, chain, plan).eval())
    model = LayerMergeUNet2DModel.from_compressed(merged, unet, example_input=(x, t))
    pipe = DDPMPipeline(unet=model, scheduler=DDPMScheduler())
    images = pipe(num_inference_steps=50).images
    pipe.save_pretrained("ddpm-layermerge")
    pipe = DDPMPipeline.from_pretrained("ddpm-layermerge")   # LayerMergeUNet2DModel imported above

``model_index.json`` names the class by this module,
``["lightning_layermerge.adapters.diffusers_model", "LayerMergeUNet2DModel"]``. diffusers
loads a component class only from a module the process has already imported (it does not
import what a repository names), so import the class first
(``from lightning_layermerge import LayerMergeUNet2DModel``), then call
``DDPMPipeline.from_pretrained``. The module also has to expose ``ModelMixin``, which
diffusers looks up next to the class to find its loading method.

This module imports diffusers; ``lightning_layermerge`` exposes the class lazily.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import fx, nn

from ..surgery.capture import ExampleInput
from ..surgery.merge import merge
from ..surgery.meta import SurgeryMeta, example_from_spec, input_spec
from ..surgery.rebuild import rebuild_compressed

__all__ = ["CONFIG_KEY", "LayerMergeUNet2DModel", "wrap_unet"]

#: Key of the LayerMerge part (kind, plan, example-input shapes) in the model config.
CONFIG_KEY = "layermerge"
#: Version of the ``layermerge`` config entry.
FORMAT = 1

# A network handed to the constructor by ``from_compressed`` (instead of rebuilding one).
_PREBUILT: contextvars.ContextVar[fx.GraphModule | None] = contextvars.ContextVar("_PREBUILT", default=None)


def _init_signature() -> inspect.Signature:
    """``UNet2DModel.__init__``'s parameters (keyword-only) plus ``layermerge``.

    diffusers' ``ConfigMixin`` reads the config keys a class accepts from its ``__init__``
    signature, so the wrapper declares every ``UNet2DModel`` argument: its config is the
    UNet's, key for key, and ``from_config`` passes them all back.
    """
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name, p in inspect.signature(UNet2DModel.__init__).parameters.items():
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    params.append(inspect.Parameter(CONFIG_KEY, inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


class LayerMergeUNet2DModel(ModelMixin, ConfigMixin):
    """A pruned or merged ``UNet2DModel`` as a diffusers model (pipelines, save/load).

    Build one with :meth:`from_compressed` (from the output of ``prune``/``merge``) or
    :meth:`from_pretrained` (from a directory written by ``save_pretrained``, alone or as
    the ``unet`` of a pipeline). Calling the constructor with a config rebuilds the
    architecture with placeholder weights.

    It is called like ``UNet2DModel`` (``model(sample, timestep).sample``) and returns the
    same ``UNet2DOutput``. A *pruned* model is trainable (fine-tune it, then :meth:`merged`);
    a *merged* one is for inference.

    Attributes:
        network: The compressed ``torch.fx.GraphModule`` (from ``prune`` or ``merge``).
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    def __init__(self, **config: Any) -> None:
        super().__init__()
        network = _PREBUILT.get()
        if network is None:
            network = _rebuild(_unet_config(self.config), self.config[CONFIG_KEY])
        self.network = network
        # State-dict keys are the network's own ("conv_in.weight", not "network.conv_in.weight"):
        # a module holding the wrapper checkpoints the same keys as one holding the bare network.
        self._register_state_dict_hook(_strip_network_prefix)
        self._register_load_state_dict_pre_hook(_add_network_prefix)

    # Declared before register_to_config reads it: every UNet2DModel argument, plus layermerge.
    __init__.__signature__ = _init_signature()  # type: ignore[attr-defined]
    __init__ = register_to_config(__init__)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_compressed(cls, network: fx.GraphModule, original: nn.Module | Mapping[str, Any], *,
                        example_input: ExampleInput | None = None, verify: bool = True) -> LayerMergeUNet2DModel:
        """Wrap the output of ``prune`` or ``merge`` of a ``UNet2DModel``.

        Args:
            network: The pruned or merged UNet (not copied: the wrapper shares its weights).
            original: The ``UNet2DModel`` it was compressed from, or that model's ``config``.
            example_input: The ``(sample, timestep)`` the plan was traced with; needed unless
                ``network`` records it (``LayerMergeCallback`` does).
            verify: Rebuild the architecture from the config now (placeholder weights) and
                check that the state-dict keys and shapes match ``network``, so that a later
                ``from_pretrained`` is known to work. Costs one trace/prune(/merge).

        Returns:
            The wrapper, in ``network``'s train/eval mode.

        Raises:
            TypeError: ``network`` is not from ``prune``/``merge``, or ``original`` is not a
                ``UNet2DModel`` (or its config).
            ValueError: no example-input shapes are known, or ``verify`` finds that the config
                and plan do not rebuild ``network``.
        """
        meta = _layermerge_meta(network)
        inputs = input_spec(example_input) if example_input is not None else meta.inputs
        if not inputs:
            raise ValueError("the network records no example input; pass example_input= (the (sample, timestep) "
                             "the plan was traced with)")
        layermerge = {"format": FORMAT, "kind": "merged" if meta.merged else "pruned",
                      "plan": meta.plan, "inputs": [[list(shape), dtype] for shape, dtype in inputs]}
        config = _unet_config(_config_of(original))
        if verify:
            _check_rebuilds(network, _rebuild(config, layermerge))
        token = _PREBUILT.set(network)
        try:
            model = cls(**config, **{CONFIG_KEY: layermerge})
        finally:
            _PREBUILT.reset(token)
        return model.train(network.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None,
                        **kwargs: Any) -> LayerMergeUNet2DModel:
        """``ModelMixin.from_pretrained``; the architecture is rebuilt from the config's plan.

        The rebuild runs the UNet once, so ``low_cpu_mem_usage`` (empty, meta-device
        weights) is turned off and ``device_map`` is refused; move the model with ``.to()``.

        Raises:
            ValueError: ``device_map`` was given.
        """
        if kwargs.get("device_map") is not None:
            raise ValueError("LayerMergeUNet2DModel.from_pretrained does not support device_map; load it and call "
                             ".to(device)")
        kwargs["low_cpu_mem_usage"] = False
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        _own_memory(model)
        return loaded

    # ------------------------------------------------------------------ use

    @property
    def kind(self) -> str:
        """``"pruned"`` (trainable; call :meth:`merged`) or ``"merged"``."""
        return self.config[CONFIG_KEY]["kind"]

    @property
    def plan(self) -> dict:
        """The plan (``Plan.to_dict()``); ``Plan.from_dict(trace(unet, x), model.plan)`` rebuilds it."""
        return self.config[CONFIG_KEY]["plan"]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, class_labels: Any = None,
                return_dict: bool = True) -> Any:
        """``UNet2DModel.forward``: ``UNet2DOutput(sample=...)``, or ``(sample,)`` with ``return_dict=False``."""
        return self.network(sample, timestep, class_labels=class_labels, return_dict=return_dict)

    def merged(self) -> LayerMergeUNet2DModel:
        """A merged copy of a pruned model (``merge(self.network)``), same dtype and device.

        Raises:
            ValueError: the model is already merged.
        """
        if self.kind == "merged":
            raise ValueError("this LayerMergeUNet2DModel is already merged")
        merged = merge(self.network)  # a merged copy; self stays as it is (also its train/eval mode)
        inputs = SurgeryMeta.of(self.network).inputs
        if inputs:
            record = SurgeryMeta.of(merged)
            record.inputs = inputs
            record.write(merged)
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        token = _PREBUILT.set(merged)
        try:
            model = type(self)(**{**config, CONFIG_KEY: {**config[CONFIG_KEY], "kind": "merged"}})
        finally:
            _PREBUILT.reset(token)
        return model.eval()


def wrap_unet(original: nn.Module, network: fx.GraphModule) -> LayerMergeUNet2DModel:
    """:meth:`LayerMergeUNet2DModel.from_compressed` without the rebuild check (adapter hook).

    Used by ``adapters.wrap_compressed`` for networks whose example input is recorded
    (those of ``LayerMergeCallback``).
    """
    return LayerMergeUNet2DModel.from_compressed(network, original, verify=False)


# ---------------------------------------------------------------------- helpers


def _layermerge_meta(network: nn.Module) -> SurgeryMeta:
    if not SurgeryMeta.present(network):
        raise TypeError(f"expected the network returned by lightning_layermerge.prune(...) or merge(...) of a "
                        f"UNet2DModel, got {type(network).__name__}")
    return SurgeryMeta.of(network)


def _config_of(original: nn.Module | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(original, UNet2DModel):
        return original.config
    if isinstance(original, nn.Module):
        raise TypeError(f"original must be the UNet2DModel the network was compressed from (or its config), got "
                        f"{type(original).__name__}")
    if not isinstance(original, Mapping):
        raise TypeError(f"original must be a UNet2DModel or its config, got {type(original).__name__}")
    name = original.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise TypeError(f"the config is of a {name}, not a UNet2DModel")
    return original


def _unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``UNet2DModel`` constructor arguments in ``config`` (private and LayerMerge keys dropped)."""
    accepted = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in accepted}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _placeholder_weights(model: nn.Module) -> None:
    """Deterministic small weights, whatever initialisation was skipped (diffusers' loading
    disables ``torch.nn.init``, leaving uninitialised memory that could hold NaNs)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.05)


def _rebuild(unet_config: Mapping[str, Any], layermerge: Mapping[str, Any]) -> fx.GraphModule:
    """``UNet2DModel(**config)`` -> trace -> prune(plan) (-> merge): the architecture, placeholder weights.

    Traced in float32, then cast to the default dtype, as any module is built in it
    (``from_pretrained(torch_dtype=...)`` sets it while constructing, then loads into it).

    Raises:
        ValueError: the ``layermerge`` entry is missing or of another format, or its plan
            does not fit this UNet configuration.
    """
    if not isinstance(layermerge, Mapping) or "plan" not in layermerge:
        raise ValueError("LayerMergeUNet2DModel needs the 'layermerge' config entry (kind, plan, inputs); build it "
                         "with LayerMergeUNet2DModel.from_compressed or from_pretrained")
    if layermerge.get("format", FORMAT) != FORMAT:
        raise ValueError(f"the 'layermerge' config entry has format {layermerge.get('format')}; this version reads "
                         f"{FORMAT}")
    dtype = torch.get_default_dtype()
    with _default_dtype(torch.float32):
        unet = UNet2DModel(**unet_config).float().eval()
        _placeholder_weights(unet)
        try:
            network = rebuild_compressed(unet, layermerge["plan"], example_from_spec(layermerge["inputs"]),
                                         merged=layermerge["kind"] == "merged")
        except ValueError as err:
            raise ValueError(f"the stored plan does not fit the stored UNet2DModel config: {err}") from err
    return network.to(dtype)


_NETWORK = "network."


def _strip_network_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` hook: ``{prefix}network.X`` -> ``{prefix}X`` (order kept)."""
    inner = prefix + _NETWORK
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_network_prefix(state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: ``{prefix}X`` -> ``{prefix}network.X`` (both key forms load)."""
    inner = prefix + _NETWORK
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def _own_memory(model: nn.Module) -> None:
    """Give every tensor that shares the loaded file's memory its own (aligned) copy.

    diffusers may assign tensors that point into the memory-mapped safetensors file, at
    offsets that are not 64-byte aligned; CPU kernels then take another code path and round
    differently (a 1x1 conv differed by 1e-8), so the reloaded model would not reproduce the
    saved one exactly.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def _check_rebuilds(network: fx.GraphModule, rebuilt: fx.GraphModule) -> None:
    want = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        differ = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise ValueError(
            "the UNet2DModel config and the plan do not rebuild this network (state-dict keys or shapes differ: "
            f"{differ[:5]}); pass the UNet2DModel it was compressed from and the example input it was traced with"
        )

