"""The `resnet-train` command: compose the config with Hydra, validate it, train."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from resnet_train.config import register_configs, validate
from resnet_train.errors import UserError

register_configs()


def _fail(error: BaseException) -> None:
    print(f"resnet-train: error: {error}", file=sys.stderr)
    sys.exit(2)


def print_summary(cfg: DictConfig) -> None:
    from resnet_train.models.build import build_model
    from resnet_train.models.summary import format_summary, summarize

    print(format_summary(cfg.model.name, summarize(build_model(cfg), cfg.data.image_size)))


class ValidateOnStart(Callback):
    """Check a single run's config before Hydra creates its output directory, so a typo leaves
    nothing behind. (Each job of a multirun is checked again when it starts.) A summary needs no
    directory either: it is printed here and the command ends."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate(config)
            if config.task == "summary":
                print_summary(config)
                sys.exit(0)
        except UserError as e:
            _fail(e)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate(config)
        except UserError as e:
            _fail(e)


@hydra.main(version_base="1.3", config_path="pkg://resnet_train.configs", config_name="train")
def train(cfg: DictConfig) -> float | None:
    from resnet_train.engine.trainer import fit  # torch and friends load only for a real run

    try:
        validate(cfg)
        if cfg.task == "summary":
            print_summary(cfg)
            return None
        metrics = fit(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (UserError, FloatingPointError) as e:
        _fail(e)
    # The return value is what Hydra sweepers (Optuna, Ax) optimise.
    valid = metrics.get("valid")
    return valid["acc"] if valid else None


def main() -> None:
    train()


if __name__ == "__main__":
    main()
