"""LightningCLI for the paper's ImageNet settings (ResNet-34, MobileNetV2-1.0) with LayerMergeCallback.

    python recipes/imagenet/main.py fit --config recipes/imagenet/configs/resnet34_lm071.yaml \
        --data.data_dir /data/imagenet --model.weights /ckpt/resnet34.pth

Each config in ``configs/`` is one row of the paper's tables: the network, the latency budget,
the fine-tuning recipe, distillation and DDP settings. See ``README.md`` next to this file.
Any value can be overridden on the command line; ``--print_config`` shows them all.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from classifier import ImageClassifier, ImageFolderDataModule


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv`` (used by the tests)."""
    return LightningCLI(ImageClassifier, ImageFolderDataModule, args=args, run=run,
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
