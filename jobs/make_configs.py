"""Writes jobs/configs/paper/<family>/*.yaml: the paper's setups (2 mm, full-width model, 8 learners,
40 rounds, 4 local epochs) for every algorithm x distribution x target, in two families that differ in
the local optimiser and the model's initialisation:

- original: the FedSparsify paper's own setup (arXiv 2208.11669, the authors' TensorFlow code): plain
  SGD, lr 5e-5, batch 1, no dropout, Glorot-uniform kernels with zero biases, instance-norm eps 1e-3;
- pytorch: the authors' later PyTorch setup: SGD lr 1e-3, batch 4, dropout 0.5, PyTorch's defaults.

Re-run after changing a family: python jobs/make_configs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedmpi.algorithms import ALGORITHMS
from fedmpi.config import DISTRIBUTIONS

COMMON = {
    "data": {"dir": "data/ukbb/split-{distribution}"},  # your preprocessed split (README, "Data")
    "model": {"width": 1.0},
    "train": {"epochs": 4, "momentum": 0.0, "device": "cuda"},
    "federation": {"learners": 8, "rounds": 40, "schedule": "cubic", "start": 1, "end": 40, "frequency": 1},
    "eval": {"every": 1, "batch_size": 8},
    "run": {"dir": "runs/paper-{family}", "checkpoint_every": 1, "keep_checkpoints": 2, "round_timeout": 7200},
}
FAMILIES = {
    "original": {"model": {"dropout": 0.0, "init": "glorot", "norm_eps": 1e-3}, "train": {"lr": 5e-5, "batch_size": 1}},
    "pytorch": {"model": {"dropout": 0.5, "init": "torch", "norm_eps": 1e-5}, "train": {"lr": 1e-3, "batch_size": 4}},
}
# Every algorithm but the centralized baseline, which has no paper config.
FEDERATED = [name for name, algo in ALGORITHMS.items() if not algo.trains_centrally]
TARGETS = (0.85, 0.9, 0.95, 0.99)


def configs():
    """(family, run name, config dict) for every paper run."""
    for family, changes in FAMILIES.items():
        for dist in DISTRIBUTIONS:
            for algo in FEDERATED:
                dense = ALGORITHMS[algo].dense
                for target in (0.0,) if dense else TARGETS:
                    name = f"{algo}-{dist}" + ("" if dense else f"-{target}")
                    cfg = yaml.safe_load(yaml.safe_dump(COMMON))
                    for section, values in changes.items():
                        cfg[section].update(values)
                    cfg["data"]["dir"] = cfg["data"]["dir"].format(distribution=dist)
                    cfg["run"]["dir"] = cfg["run"]["dir"].format(family=family)
                    cfg["federation"].update(algorithm=algo, target=target)
                    cfg["run"]["name"] = name
                    yield family, name, cfg


def main(out: Path = Path(__file__).parent / "configs" / "paper") -> None:
    for family, name, cfg in configs():
        (out / family).mkdir(parents=True, exist_ok=True)
        (out / family / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__).parse_args()  # takes no arguments: refuse any, answer --help
    main()
