"""LayerMergeUNet2DModel: a pruned/merged UNet2DModel inside DDPMPipeline / DDIMPipeline, and
pipeline save_pretrained / from_pretrained (rebuilt from config + plan, no pickled code)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import load_recipe, random_plan, rel_err
from lm_helpers import FAST_LATENCY, TINY_UNET, one_thread, quiet_trainer
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_layermerge import LayerMergeCallback, LayerMergeUNet2DModel, adapters, merge, prune, trace

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

DiffusionModule = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "ddpm" / "diffusion.py").DiffusionModule

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

TIMESTEPS = 50  # scheduler training timesteps
STEPS = 4  # inference steps


def _unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**TINY_UNET).eval()


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 40])


def _pipelines(unet: nn.Module) -> list:
    return [DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=TIMESTEPS)),
            DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=TIMESTEPS))]


def _images(pipe, batch: int = 2) -> torch.Tensor:
    """Pipeline samples from a fixed generator, as a tensor in [-1, 1] (``output_type="pt"``-like)."""
    out = pipe(batch_size=batch, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def compressed():
    """A random plan on the tiny UNet: (original, example, pruned GraphModule, merged GraphModule)."""
    unet, example = _unet(), _example()
    chain = trace(unet, example)
    plan = random_plan(chain, random.Random(3))
    assert any(len(s.convs) > 1 for s in plan.segments) or any(len(s.convs) < s.j - s.i for s in plan.segments)
    pruned = prune(unet, chain, plan).eval()
    return unet, example, pruned, merge(pruned)


def test_wrapper_has_the_unet_config_dtype_device_and_output(compressed) -> None:
    unet, example, pruned, merged = compressed
    model = LayerMergeUNet2DModel.from_compressed(merged, unet, example_input=example)
    assert model.kind == "merged" and model.network is merged
    for key in ("sample_size", "in_channels", "out_channels", "block_out_channels", "norm_num_groups"):
        assert model.config[key] == unet.config[key], key
    assert model.config.layermerge["plan"] == merged.meta["layermerge"]["plan"]
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    x, t = example
    with torch.no_grad():
        out = model(x, t)
        assert type(out) is type(unet(x, t)) and torch.equal(out.sample, merged(x, t).sample)
        assert torch.equal(model(x, 7, return_dict=False)[0], merged(x, 7).sample)
    model.to(torch.float64)
    assert model.dtype == torch.float64 and model.device == torch.device("cpu")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        assert model(x.double(), t).sample.dtype == torch.float64
    model.to(torch.float32)


def test_state_dict_keys_are_the_networks(compressed) -> None:
    # A module holding the wrapper checkpoints the same keys as one holding the bare network
    # (checkpoints written after LayerMergeCallback's fit load into the rebuilt network).
    unet, example, pruned, merged = compressed
    model = LayerMergeUNet2DModel.from_compressed(copy.deepcopy(merged), unet, example_input=example)
    want = merged.state_dict()
    assert list(model.state_dict()) == list(want)
    holder = nn.ModuleDict({"unet": model})
    assert list(holder.state_dict()) == [f"unet.{k}" for k in want]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    holder.load_state_dict({f"unet.{k}": v for k, v in want.items()}, strict=True)
    x, t = example
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, merged(x, t).sample)
    copied = copy.deepcopy(model)
    assert list(copied.state_dict()) == list(want)


def test_pruned_and_merged_sample_through_ddpm_and_ddim_pipelines(compressed) -> None:
    unet, example, pruned, merged = compressed
    as_pruned = LayerMergeUNet2DModel.from_compressed(pruned, unet, example_input=example)
    as_merged = LayerMergeUNet2DModel.from_compressed(merged, unet, example_input=example)
    assert as_pruned.kind == "pruned"
    for pipe_p, pipe_m, pipe_o in zip(_pipelines(as_pruned), _pipelines(as_merged), _pipelines(unet)):
        assert pipe_m.device == torch.device("cpu") and pipe_m.dtype == torch.float32
        got_p, got_m, original = _images(pipe_p), _images(pipe_m), _images(pipe_o)
        assert got_m.shape == original.shape == (2, 8, 8, 1)
        assert torch.isfinite(got_m).all()
        assert rel_err(got_p, got_m) <= 1e-4, type(pipe_m).__name__  # merge is exact up to float32 rounding
        assert rel_err(original, got_m) > 1e-3  # the random plan changed the function
        # In float64 (pipe.to(dtype) moves the wrapper; the pipeline then draws float64 noise):
        # merged and pruned agree to the float32 rounding of the merged weights.
        pipe_m.to(torch.float64), pipe_p.to(torch.float64)
        assert pipe_m.unet.dtype == torch.float64 and pipe_m.dtype == torch.float64
        assert pipe_m.device == torch.device("cpu")
        assert rel_err(_images(pipe_p), _images(pipe_m)) <= 1e-6
        pipe_m.to(torch.float32), pipe_p.to(torch.float32)


def test_save_pretrained_from_pretrained_round_trip(compressed, tmp_path: Path) -> None:
    unet, example, pruned, merged = compressed
    for kind, network in (("merged", merged), ("pruned", pruned)):
        model = LayerMergeUNet2DModel.from_compressed(network, unet, example_input=example)
        for pipe in _pipelines(model):
            name = type(pipe).__name__
            folder = tmp_path / f"{kind}-{name}"
            want = _images(pipe)
            pipe.save_pretrained(folder)
            # Weights and JSON only: nothing that runs code when loaded.
            files = sorted(p.name for p in (folder / "unet").iterdir())
            assert files == ["config.json", "diffusion_pytorch_model.safetensors"], files
            index = json.loads((folder / "model_index.json").read_text())
            assert index["unet"] == ["lightning_layermerge.adapters.diffusers_model", "LayerMergeUNet2DModel"]
            config = json.loads((folder / "unet" / "config.json").read_text())
            assert config["layermerge"]["kind"] == kind and config["sample_size"] == 8

            loaded = type(pipe).from_pretrained(folder)
            assert type(loaded.unet) is LayerMergeUNet2DModel and loaded.unet.kind == kind
            assert rel_err(want, _images(loaded)) <= 1e-5, (kind, name)
            x, t = example
            with torch.no_grad():
                assert rel_err(model(x, t).sample, loaded.unet(x, t).sample) <= 1e-5, (kind, name)
            # Loaded in another dtype, then moved: dtype and device follow.
            double = LayerMergeUNet2DModel.from_pretrained(folder / "unet", torch_dtype=torch.float64)
            assert double.dtype == torch.float64 and double.device == torch.device("cpu")
            with torch.no_grad():
                assert rel_err(model(x, t).sample, double(x.double(), t).sample.float()) <= 1e-5


def test_reloaded_pruned_model_fine_tunes_and_merges(compressed, tmp_path: Path) -> None:
    unet, example, pruned, _ = compressed
    model = LayerMergeUNet2DModel.from_compressed(copy.deepcopy(pruned), unet, example_input=example)
    model.save_pretrained(tmp_path / "unet")
    loaded = LayerMergeUNet2DModel.from_pretrained(tmp_path / "unet").train()
    x, t = example
    opt = torch.optim.SGD(loaded.parameters(), lr=1e-2)
    loss = loaded(x, t).sample.square().mean()
    loss.backward()
    opt.step()
    merged = loaded.merged()
    assert merged.kind == "merged" and isinstance(merged.network, fx.GraphModule)
    assert merged.config.layermerge["plan"] == loaded.config.layermerge["plan"]
    with torch.no_grad():
        assert rel_err(loaded.eval()(x, t).sample, merged(x, t).sample) <= 1e-4
        assert rel_err(model(x, t).sample, merged(x, t).sample) > 1e-5  # the step changed the weights
    with pytest.raises(ValueError, match="already merged"):
        merged.merged()


def test_callback_output_is_a_pipeline_unet(tmp_path: Path) -> None:
    """What LayerMergeCallback leaves on the module: samples in both pipelines and round-trips."""
    L.seed_everything(0)
    images = torch.rand(48, 1, 8, 8) * 2 - 1
    module = DiffusionModule(TINY_UNET, num_train_timesteps=TIMESTEPS, lr=1e-3, example_batch=4)
    original = copy.deepcopy(module.unet).eval()
    chain = trace(module.unet, module.example_input_array)
    plan = random_plan(chain, random.Random(5))
    cb = LayerMergeCallback(budget=0.9, target="unet", plan=plan.to_dict(), latency=FAST_LATENCY, cache_dir=False,
                            verbose=False)
    trainer = quiet_trainer(max_steps=2, callbacks=[cb], limit_val_batches=1)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(images[:32]), batch_size=8),
                val_dataloaders=DataLoader(TensorDataset(images[32:]), batch_size=8))
    assert cb.report.merged
    unet = module.unet  # handed back as a diffusers model (adapters.wrap_compressed)
    assert isinstance(unet, LayerMergeUNet2DModel) and unet.kind == "merged"
    assert adapters.unwrap_compressed(unet) is unet.network
    x, t = module.example_input_array
    with torch.no_grad():
        assert type(unet(x, t)) is type(original(x, t))
    assert unet.config.sample_size == 8 and unet.config.layermerge["plan"]["segments"] == plan.to_dict()["segments"]
    # A further fit with the callback recognises the wrapped network as compressed and only fine-tunes it.
    with pytest.warns(UserWarning, match="already compressed"):
        quiet_trainer(max_steps=1, callbacks=[LayerMergeCallback(budget=0.9, target="unet")],
                      limit_val_batches=0).fit(module, train_dataloaders=DataLoader(TensorDataset(images), batch_size=8))
    assert module.unet is unet
    for pipe in _pipelines(unet):
        want = _images(pipe, batch=3)
        assert want.shape == (3, 8, 8, 1) and torch.isfinite(want).all()
        pipe.save_pretrained(tmp_path / type(pipe).__name__)
        loaded = type(pipe).from_pretrained(tmp_path / type(pipe).__name__)
        assert rel_err(want, _images(loaded, batch=3)) <= 1e-5
        # In float64 (the pipelines then draw float64 noise): saved and reloaded still agree.
        pipe.to(torch.float64), loaded.to(torch.float64)
        assert loaded.unet.dtype == torch.float64 and loaded.device == torch.device("cpu")
        assert rel_err(_images(pipe, batch=3), _images(loaded, batch=3)) <= 1e-12
        pipe.to(torch.float32)  # both pipelines share the unet


def test_wrap_compressed_leaves_other_networks_alone(compressed) -> None:
    _, _, pruned, _ = compressed
    convnet = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU())
    assert adapters.wrap_compressed(convnet, pruned) is pruned  # no adapter wraps a plain Sequential
    assert adapters.wrap_compressed(_unet(), convnet) is convnet  # not a compressed network
    assert adapters.unwrap_compressed(pruned) is pruned and adapters.unwrap_compressed(convnet) is convnet


def test_errors_are_clear(compressed, tmp_path: Path) -> None:
    unet, example, pruned, merged = compressed
    with pytest.raises(TypeError, match="prune"):
        LayerMergeUNet2DModel.from_compressed(unet, unet, example_input=example)
    with pytest.raises(TypeError, match="UNet2DModel"):
        LayerMergeUNet2DModel.from_compressed(merged, nn.Conv2d(1, 1, 1), example_input=example)
    bare = copy.deepcopy(merged)
    bare.meta["layermerge"].pop("inputs", None)
    with pytest.raises(ValueError, match="example_input"):
        LayerMergeUNet2DModel.from_compressed(bare, unet)
    other = {**unet.config, "block_out_channels": (8, 32)}
    with pytest.raises(ValueError, match="plan does not fit|do not rebuild"):
        LayerMergeUNet2DModel.from_compressed(merged, other, example_input=example)
    with pytest.raises(ValueError, match="layermerge"):
        LayerMergeUNet2DModel(**TINY_UNET)
    LayerMergeUNet2DModel.from_compressed(merged, unet, example_input=example).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="device_map"):
        LayerMergeUNet2DModel.from_pretrained(tmp_path, device_map="cpu")

