"""LightningCLI example: LayerMerge compression configured entirely from YAML.

Train (or reuse) an uncompressed network, then compress it with the callback declared under
``trainer.callbacks`` in ``compress.yaml``::

    python recipes/quickstart.py                       # writes runs/quickstart/uncompressed.pt
    python recipes/cli/main.py fit --config recipes/cli/compress.yaml
    python recipes/cli/main.py fit --config recipes/cli/compress.yaml --trainer.callbacks.init_args.budget=0.5

Any callback argument can be overridden on the command line; ``--print_config`` shows them all.

Torch runs with ``LM_THREADS`` threads (default 1): on a shared 2-core CPU, two threads were
measured 10-25x slower than one as soon as another process was busy (importance table of
this recipe: 15 min with 2 threads, 30 s with 1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

# The digits model and data come from the recipes folder above this one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv`` (used by the tests)."""
    return LightningCLI(DigitsClassifier, DigitsDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("LM_THREADS", "1")))
    main()
