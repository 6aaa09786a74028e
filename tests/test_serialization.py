"""Save/load of compressed networks and their TorchScript and ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import pytest
import torch
from lm_helpers import TinyNet
from torch import nn

from lightning_layermerge import Plan, merge, prune, trace
from lightning_layermerge.surgery.serialization import (
    attach_input_spec,
    export_onnx,
    export_torchscript,
    load_compressed,
    save_compressed,
)


@pytest.fixture()
def networks() -> tuple[nn.Module, torch.Tensor, nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = TinyNet(8).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding is really exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 1, 8, 8)
    chain = trace(model, x)
    plan = Plan.from_segments(chain, [(0, 1, 3), (1, 3, 5), (3, 4, 3)])
    pruned = prune(model, chain, plan).eval()
    merged = merge(pruned)
    attach_input_spec(pruned, x)
    attach_input_spec(merged, x)
    return model, x, pruned, merged


@pytest.mark.parametrize("which", ["pruned", "merged"])
def test_round_trip_both_ways(which: str, networks, tmp_path: Path) -> None:
    model, x, pruned, merged = networks
    net = pruned if which == "pruned" else merged
    path = save_compressed(net, tmp_path / f"{which}.pt")
    with torch.no_grad():
        want = net(x)
        pickled = load_compressed(path).eval()
        rebuilt = load_compressed(path, original=TinyNet(8)).eval()  # other weights: only the architecture counts
        assert torch.equal(pickled(x), want)
        assert torch.equal(rebuilt(x), want)
    assert pickled.meta["layermerge"]["merged"] == (which == "merged")
    # A loaded pruned network can still be merged, and equals the merged one.
    if which == "pruned":
        with torch.no_grad():
            assert torch.allclose(merge(pickled)(x), merged(x), rtol=1e-5, atol=1e-6)


def test_example_input_needed_for_rebuild_and_errors(networks, tmp_path: Path) -> None:
    model, x, pruned, _ = networks
    chain = trace(model, x)
    bare = prune(model, chain, Plan.keep_all(chain))  # from the functional API: no input spec recorded
    path = save_compressed(bare, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="pass example_input="):
        load_compressed(path, original=TinyNet(8))
    rebuilt = load_compressed(path, original=TinyNet(8), example_input=x)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), bare.eval()(x))
    with pytest.raises(TypeError, match="prune"):
        save_compressed(model, tmp_path / "plain.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not written by"):
        load_compressed(tmp_path / "other.pt")


def test_torchscript(networks, tmp_path: Path) -> None:
    _, x, pruned, merged = networks
    for name, net in (("pruned", pruned), ("merged", merged)):
        path = export_torchscript(net, tmp_path / f"{name}.ts")
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            assert torch.allclose(loaded(x), net(x), rtol=1e-6, atol=1e-6), name


def test_onnx_with_dynamic_batch(networks, tmp_path: Path) -> None:
    _, x, _, merged = networks
    path = export_onnx(merged, tmp_path / "merged.onnx", x)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops  # BN folded, convs merged
    conv_count = sum(n.op_type == "Conv" for n in proto.graph.node)
    assert conv_count == sum(isinstance(m, nn.Conv2d) for m in merged.modules())
    run = onnx.reference.ReferenceEvaluator(proto)
    x7 = torch.randn(7, 1, 8, 8)  # another batch size than at export
    got = run.run(None, {"input0": x7.numpy()})[0]
    with torch.no_grad():
        want = merged(x7).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
