"""Loading compressed networks and checkpoints runs no code from the file.

Files whose pickle payload would create a marker directory are refused by default and only
``trusted=True`` unpickles them; crafted graph descriptions naming something outside the
allow-lists are refused without importing it; torchvision, timm and diffusers networks load
in a fresh process where their library cannot be imported and compute the same outputs.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from helpers import random_plan, randomize_batchnorm
from lm_helpers import LitTiny, TinyNet, loaders, quiet_trainer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_layermerge
from lightning_layermerge import Plan, merge, prune, trace
from lightning_layermerge.fit.resume import restore_pruned, state_from_checkpoint
from lightning_layermerge.surgery.serialization import (
    attach_input_spec,
    export_onnx,
    export_torchscript,
    load_compressed,
    read_checkpoint,
    save_compressed,
)


class Payload:
    """Unpickling this creates ``marker`` (a directory): stands for any code in a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _tiny(seed: int = 0) -> tuple[torch.Tensor, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = randomize_batchnorm(TinyNet(8).eval())
    x = torch.randn(4, 1, 8, 8)
    chain = trace(model, x)
    pruned = prune(model, chain, Plan.from_segments(chain, [(0, 1, 3), (1, 3, 5), (3, 4, 3)])).eval()
    attach_input_spec(pruned, x)
    merged = merge(pruned)
    return x, pruned, merged


def _legacy_file(net: nn.Module, path: Path, module: object, extra: object = None) -> Path:
    """A file in the previous layout (format 1: the GraphModule pickled inside torch.save)."""
    blob = io.BytesIO()
    torch.save(module, blob)
    meta = net.meta["layermerge"]
    torch.save({"format": 1, "kind": "merged" if meta["merged"] else "pruned", "plan": meta["plan"],
                "inputs": meta["inputs"], "meta": meta, "nodes": [n.name for n in net.graph.nodes],
                "state_dict": net.state_dict(), "module": blob.getvalue(), "extra": extra}, path)
    return path


# ====================================================================== refusing code


def test_old_layout_with_code_in_its_network_is_refused(tmp_path: Path) -> None:
    x, _, merged = _tiny()
    marker = tmp_path / "ran"
    path = _legacy_file(merged, tmp_path / "old.pt", Payload(marker))
    with pytest.raises(ValueError, match=r"old layout.*run code from the file.*trusted=True"):
        load_compressed(path)
    assert not marker.exists()
    # Rebuilding from plan + weights reads the file with weights_only=True: still nothing runs.
    rebuilt = load_compressed(path, original=TinyNet(8))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), merged(x))
    assert not marker.exists()
    with pytest.raises(AttributeError):  # the payload ran and returned no network
        load_compressed(path, trusted=True)
    assert marker.exists()  # trusted=True is the only way in


def test_old_layout_with_code_in_its_outer_pickle_is_refused(tmp_path: Path) -> None:
    x, _, merged = _tiny()
    marker = tmp_path / "ran"
    path = _legacy_file(merged, tmp_path / "old.pt", merged, extra=Payload(marker))
    with pytest.raises(ValueError, match=r"refusing to read .*trusted=True"):
        load_compressed(path)
    with pytest.raises(ValueError, match="refusing to read"):
        load_compressed(path, original=TinyNet(8))
    assert not marker.exists()
    loaded = load_compressed(path, trusted=True)
    assert marker.exists()
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))


def test_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": Payload(marker)}, "layermerge": {}}, path)
    for read in (read_checkpoint, state_from_checkpoint, lambda p: restore_pruned(LitTiny(), p)):
        with pytest.raises(ValueError, match=r"refusing to read .*GLOBAL (posix|nt|os)\.mkdir.*trusted=True"):
            read(path)
    assert not marker.exists()
    read_checkpoint(path, trusted=True)
    assert marker.exists()


def _rewrite_header(path: Path, edit) -> Path:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    header = json.loads(metadata["header"])
    edit(header)
    save_file(load_file(str(path)), str(path), metadata={**metadata, "header": json.dumps(header)})
    return path


def _node(header: dict, op: str) -> dict:
    return next(n for n in header["graph"]["nodes"] if n["op"] == op)


@pytest.mark.parametrize("attack, message", [
    (lambda h: _node(h, "call_function").update(target="evil_module_17.run"), "evil_module_17.run"),
    (lambda h: h["graph"]["root"]["children"]["fc"].update({"class": "evil_module_17.Evil"}), "evil_module_17.Evil"),
    (lambda h: _node(h, "call_function").update(op="call_method", target="__reduce__"), "__reduce__"),
    (lambda h: _node(h, "call_function").update(target="builtins.getattr",
                                                 args={"$tuple": [{"$node": "x"}, "__class__"]}), "__class__"),
    (lambda h: _node(h, "call_module").update(name="x; import os"), "x; import os"),
    (lambda h: h["graph"]["root"]["children"]["fc"]["attrs"].update(forward="evil"), "forward"),
])
def test_crafted_graph_is_refused_without_importing(attack, message: str, tmp_path: Path) -> None:
    _, _, merged = _tiny()
    path = _rewrite_header(save_compressed(merged, tmp_path / "net.safetensors"), attack)
    with pytest.raises(ValueError, match=f"refusing to load the stored graph: .*{message[:12]}"):
        load_compressed(path)
    assert "evil_module_17" not in sys.modules


def test_graph_outside_the_allow_lists_saves_plan_and_weights(tmp_path: Path) -> None:
    class Erf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyNet(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.erf(self.net(x))

    torch.manual_seed(0)
    model, x = Erf().eval(), torch.randn(4, 1, 8, 8)
    chain = trace(model, x)
    merged = merge(prune(model, chain, Plan.keep_all(chain)))
    with pytest.warns(UserWarning, match="torch.*erf.*original="):
        path = save_compressed(merged, tmp_path / "erf.safetensors", example_input=x)
    with pytest.raises(ValueError, match="no self-contained graph.*erf"):
        load_compressed(path)
    rebuilt = load_compressed(path, original=Erf())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), merged(x))


def test_plain_files_are_not_compressed_networks(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "text.txt").write_text("hello")
    for name in ("plain.safetensors", "text.txt"):
        with pytest.raises(ValueError, match="not written by"):
            load_compressed(tmp_path / name)


# ====================================================================== checkpoints


def test_callback_checkpoints_are_plain_data(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_layermerge import LayerMergeCallback

    class WithHyperparameters(LitTiny):
        def __init__(self, width: int = 8, example: bool = True, blocks: tuple = (1, 2)) -> None:
            super().__init__(width=width, example=example)
            self.save_hyperparameters()  # plain values: still weights_only-readable

    module = WithHyperparameters()
    chain = trace(module.model, module.example_input_array)
    plan = random_plan(chain, random.Random(1)).to_dict()
    cb = LayerMergeCallback(budget=0.9, plan=plan, cache_dir=False, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    train, _ = loaders(n=64)
    quiet_trainer(max_steps=2, callbacks=[cb, ckpt], enable_checkpointing=True).fit(module, train_dataloaders=train)
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = read_checkpoint(path)  # weights_only=True
    assert saved["layermerge"]["plan"] == plan and saved["hyper_parameters"]["blocks"] == (1, 2)
    assert saved["callbacks"]["LayerMergeCallback"]["plan"] == plan
    assert state_from_checkpoint(path)["plan"] == plan
    restored = restore_pruned(LitTiny(example=True), path)
    with torch.no_grad():  # after fit the callback has merged module.model; the restored one is pruned
        x = module.example_input_array
        assert torch.allclose(restored.eval()(x), module.eval()(x), rtol=1e-5, atol=1e-6)


# ====================================================================== round trips


_CHILD = """
import json, sys
blocked = sys.argv[1].split(",")
for name in blocked:
    sys.modules[name] = None  # `import name` raises ImportError: the original classes are unavailable
import torch
from safetensors.torch import load_file
from lightning_layermerge import load_compressed
torch.set_num_threads(1)
results = []
for path, io_path in zip(sys.argv[2::2], sys.argv[3::2]):
    net = load_compressed(path)
    data = load_file(io_path)
    args = [data[f"in{i}"] for i in range(sum(k.startswith("in") for k in data))]
    with torch.no_grad():
        out = net(*args)
    kind = type(out).__name__
    if not isinstance(out, torch.Tensor):
        assert out[0] is out.sample
        out = out.sample
    want = data["out"]
    results.append({"err": float((out - want).abs().max() / want.abs().max()), "kind": kind,
                    "training": net.training})
print(json.dumps({"results": results, "blocked_loaded": [m for m in blocked if sys.modules.get(m)]}))
"""


def _load_elsewhere(cases: list[tuple[Path, tuple[torch.Tensor, ...], torch.Tensor]], block: list[str]) -> list[dict]:
    """Load each ``(path, args, want)`` in one fresh interpreter in which ``block`` cannot be
    imported; the relative output error, output type and mode of each."""
    argv = []
    for path, args, want in cases:
        data = path.with_suffix(".io")
        save_file({**{f"in{i}": a.contiguous() for i, a in enumerate(args)}, "out": want.contiguous()}, str(data))
        argv += [str(path), str(data)]
    root = str(Path(lightning_layermerge.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _CHILD, ",".join(block), *argv],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert not answer["blocked_loaded"], answer
    return answer["results"]


def _compress(model: nn.Module, args: tuple, seed: int) -> tuple[nn.Module, nn.Module]:
    chain = trace(model, args)
    pruned = prune(model, chain, random_plan(chain, random.Random(seed))).eval()
    attach_input_spec(pruned, args)
    return pruned, merge(pruned)


LIBRARIES = ["torchvision", "timm", "diffusers"]


def test_torchvision_round_trip_in_fresh_process(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.mobilenet_v3_small(num_classes=10).eval())
    x = torch.randn(2, 3, 32, 32)
    _, merged = _compress(model, (x,), seed=0)
    with torch.no_grad():
        want = merged(x)
    path = save_compressed(merged, tmp_path / "mobilenet.safetensors")
    [got] = _load_elsewhere([(path, (x,), want)], LIBRARIES)
    assert got["err"] <= 1e-6 and got["kind"] == "Tensor" and not got["training"], got


def test_timm_round_trip_in_fresh_process(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # BatchNormAct2d (decomposed) and DropPath (saved as lightning_layermerge.modules.DropPath).
    model = randomize_batchnorm(timm.create_model("tinynet_e", num_classes=10, drop_path_rate=0.1).eval())
    x = torch.randn(2, 3, 32, 32)
    pruned, merged = _compress(model, (x,), seed=1)
    cases = []
    for name, net in (("pruned", pruned), ("merged", merged)):
        with torch.no_grad():
            cases.append((save_compressed(net, tmp_path / f"{name}.safetensors"), (x,), net(x)))
    for got in _load_elsewhere(cases, LIBRARIES):
        assert got["err"] <= 1e-6 and got["kind"] == "Tensor", got


def test_unet_round_trip_in_fresh_process(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from test_unet import SMALL

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**SMALL).eval()  # attention: saved as lightning_layermerge.modules.SelfAttention
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 500])
    pruned, merged = _compress(unet, (x, t), seed=2)
    cases = []
    for name, net in (("pruned", pruned), ("merged", merged)):
        with torch.no_grad():
            cases.append((save_compressed(net, tmp_path / f"{name}.safetensors"), (x, t), net(x, t).sample))
    for got in _load_elsewhere(cases, LIBRARIES):
        # Without diffusers the output is lightning_layermerge's UNetOutput (.sample, [0]).
        assert got["err"] <= 1e-6 and got["kind"] == "UNetOutput", got
    path = cases[-1][0]
    def parameters(fn) -> list:  # names, kinds and defaults (type annotations are not stored)
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert parameters(load_compressed(path).forward) == parameters(merged.forward)
    with torch.no_grad():  # with diffusers installed, the loaded network answers like the UNet
        out = load_compressed(path)(x, t)
        assert type(out) is type(unet(x, t)) and load_compressed(path)(x, t, return_dict=False)[0].shape == x.shape


def test_library_pieces_are_saved_as_stand_ins(tmp_path: Path) -> None:
    torchvision, timm = pytest.importorskip("torchvision"), pytest.importorskip("timm")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            # A member name that is no identifier (torchvision's RegNet has "block1-0").
            self.add_module("block1-0", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                                      timm.layers.activations.GELU()))
            self.drop = torchvision.ops.StochasticDepth(0.2, "row")  # a torchvision function in the graph
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            return self.head(x + self.drop(getattr(self, "block1-0")(x)))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    chain = trace(model, x)
    for net in (prune(model, chain, Plan.keep_all(chain)).eval(), merge(prune(model, chain, Plan.keep_all(chain)))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # all portable
            path = save_compressed(net, tmp_path / "net.safetensors", example_input=x)
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata()["header"]
        assert "lightning_layermerge.modules.stochastic_depth" in header and "torch.nn.GELU" in header
        assert "torchvision" not in header and "timm" not in header
        with torch.no_grad():
            assert torch.equal(load_compressed(path)(x), net(x))


def test_loaded_network_exports_to_torchscript_and_onnx(tmp_path: Path) -> None:
    x, _, merged = _tiny()
    loaded = load_compressed(save_compressed(merged, tmp_path / "net.safetensors"))
    with torch.no_grad():
        want = merged(x)
        assert torch.equal(loaded(x), want)
        scripted = torch.jit.load(str(export_torchscript(loaded, tmp_path / "net.ts")))
        assert torch.allclose(scripted(x), want, rtol=1e-6, atol=1e-6)
    onnx_path = export_onnx(loaded, tmp_path / "net.onnx", x)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input0": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_loaded_pruned_network_trains_and_merges(tmp_path: Path) -> None:
    x, pruned, merged = _tiny()
    loaded = load_compressed(save_compressed(pruned, tmp_path / "pruned.safetensors"))
    assert not loaded.training
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in pruned.named_parameters() if p.requires_grad}
    with torch.no_grad():
        assert torch.allclose(merge(loaded)(x), merged(x), rtol=1e-5, atol=1e-6)
    loaded.train()(x).sum().backward()  # still a trainable network
    assert all(p.grad is not None for p in loaded.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unportable in a plain CNN
        save_compressed(loaded, tmp_path / "again.safetensors")
