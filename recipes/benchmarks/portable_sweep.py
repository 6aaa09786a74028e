"""Save and load merged torchvision and timm CNNs in the safe format; compare outputs.

For each network: trace at 1x3x64x64, keep every conv (``Plan.keep_all``), merge (BatchNorm
folded), ``save_compressed``, ``load_compressed``, and compare the loaded network's output
with the in-memory one's. Prints and writes ``results/portable_sweep.md`` (whether the graph
was portable, and the largest relative output difference).

Usage::

    python recipes/benchmarks/portable_sweep.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lightning_layermerge import Plan, fold_batchnorm, load_compressed, merge, save_compressed, trace  # noqa: E402

TORCHVISION = ["mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "squeezenet1_0", "densenet121",
               "regnet_x_400mf", "mnasnet0_5", "convnext_tiny", "vgg11_bn", "resnext50_32x4d"]
TIMM = ["mobilenetv3_small_050", "regnetx_002", "resnet18d", "ghostnet_050", "convnext_atto", "lcnet_050",
        "repvgg_a0", "dla34", "cspresnet50", "mixnet_s"]
RESULTS = Path(__file__).parent / "results" / "portable_sweep.md"


def build(library: str, name: str) -> torch.nn.Module:
    if library == "torchvision":
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10)
    import timm

    return timm.create_model(name, num_classes=10)


def check(model: torch.nn.Module, folder: str) -> str:
    """``"portable, rel. diff X"`` or why the graph was stored as plan + weights only."""
    x = torch.randn(1, 3, 64, 64)
    chain = trace(model.eval(), x)
    merged = fold_batchnorm(model, chain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = save_compressed(merged, Path(folder) / "net.safetensors", example_input=x)
    unportable = [str(w.message) for w in caught if "save_compressed" in str(w.message)]
    if unportable:
        return f"not portable: {unportable[0][:120]}"
    with torch.no_grad():
        want, got = merged(x), load_compressed(path)(x)
    return f"portable, max rel. difference {float((got - want).abs().max() / want.abs().max()):.1e}"


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = ["| library | network | result |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        for library, names in (("torchvision", TORCHVISION), ("timm", TIMM)):
            for name in names:
                rows.append(f"| {library} | {name} | {check(build(library, name), folder)} |")
                print(rows[-1], flush=True)
    text = (f"Merged (keep-all plan) at 1x3x64x64, saved and loaded (torch {torch.__version__}).\n\n"
            + "\n".join(rows) + "\n")
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
