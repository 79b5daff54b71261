"""Writes jobs/configs/paper/*.yaml: the paper's setups (2 mm, full model, 8 learners, 40 rounds,
4 local epochs) for every algorithm x distribution x target. Re-run after changing the base."""
from pathlib import Path

import yaml

BASE = {
    "data": {"dir": "data/ukbb/split-{distribution}"},  # your preprocessed split (README, "Your own data")
    "model": {"width": 1.0, "dropout": 0.5},
    "train": {"epochs": 4, "batch_size": 4, "lr": 0.001, "momentum": 0.0, "device": "cuda"},
    "federation": {"learners": 8, "rounds": 40, "schedule": "cubic", "start": 1, "end": 40, "frequency": 1},
    "eval": {"every": 1, "batch_size": 8},
    "run": {"checkpoint_every": 1, "keep_checkpoints": 2, "round_timeout": 7200},
}
ALGORITHMS = ("fedavg", "fedsparsify-global", "fedsparsify-local", "oneshot", "random", "snip")
DISTRIBUTIONS = ("uniform-iid", "uniform-noniid", "skewed-noniid")
TARGETS = (0.85, 0.9, 0.95, 0.99)


def configs():
    for dist in DISTRIBUTIONS:
        for algo in ALGORITHMS:
            for target in (0.0,) if algo == "fedavg" else TARGETS:
                name = f"{algo}-{dist}" + (f"-{target}" if algo != "fedavg" else "")
                cfg = yaml.safe_load(yaml.safe_dump(BASE))
                cfg["data"]["dir"] = cfg["data"]["dir"].format(distribution=dist)
                cfg["federation"].update(algorithm=algo, target=target)
                if algo == "oneshot":
                    cfg["federation"]["oneshot_round"] = 1
                cfg["run"]["name"] = name
                yield name, cfg


def main(out: Path = Path(__file__).parent / "configs" / "paper") -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, cfg in configs():
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


if __name__ == "__main__":
    main()
