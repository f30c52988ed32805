"""Train one run (or a sweep with -m). All logic lives in zipfls_train; this file only hands the
composed config to it.

    python train.py dataset=tinyimagenet model=cifar_resnet18 loss=zipf
    python train.py -m loss=ce,ls,zipf seed=0,1,2,3,4
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from zipfls_train.engine.naming import register_resolvers

register_resolvers()  # before Hydra composes: the sweep subdir uses ${safe_dirname:...}


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from zipfls_train.engine.run import run_training
    from zipfls_train.errors import user_errors

    try:
        summary = run_training(cfg, Path(HydraConfig.get().runtime.output_dir))
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    # Returned for Hydra sweepers that optimise a metric.
    return None if summary is None else summary.get("best_val_top1")


if __name__ == "__main__":
    main()
