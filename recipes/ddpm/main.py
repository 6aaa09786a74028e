"""LightningCLI for DDPM compression: ``DiffusionModule`` + an image-folder datamodule, the callback from YAML.

    python recipes/ddpm/main.py fit --config recipes/ddpm/cifar10_073.yaml \
        --model.unet /path/to/ddpm-cifar10-32/unet --data.root /path/to/cifar10/train

See ``README.md`` next to this file for the paper's setting and what to expect.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.cli import LightningCLI

from diffusion import DiffusionModule, ImageFolderImages


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv`` (used by the tests)."""
    return LightningCLI(DiffusionModule, ImageFolderImages, args=args, run=run,
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("LM_THREADS", str(torch.get_num_threads()))))
    main()
