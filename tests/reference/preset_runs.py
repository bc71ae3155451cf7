"""Final losses and a weights digest of a short run of every optimizer preset.

A refactor must leave training results bitwise unchanged. ``preset_runs.json`` beside this file
holds what this script printed before the last refactor; ``tests/test_preset_reference.py``
re-runs the same configurations and compares. When a change is *meant* to alter the numerics,
regenerate the file with::

    OMP_NUM_THREADS=1 python -m tests.reference.preset_runs --write

and say why in the commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "preset_runs.json"

PRESETS = [
    "sgd",
    "adamw",
    "lars",
    "lamb",
    "kfac",
    "kfac_eigen",
    "kfac_inverse",
    "newton",
    "newton_cg",
    "ggn_cg",
    "curveball",
    "neumann",
]

# One small MLP for all (exact Newton needs few parameters), plus K-FAC on the 1-D CNN (its conv
# layers) and K-FAC with in-process curvature workers.
CASES: dict[str, list[str]] = {
    **{name: [f"optimizer={name}", "model=mlp", "model.hidden=[24,24]"] for name in PRESETS},
    "kfac-cnn1d": [
        "optimizer=kfac",
        "model=cnn1d",
        "optimizer.factor_update_every=2",
        "optimizer.inverse_update_every=4",
    ],
    "kfac-workers-sync": [
        "optimizer=kfac",
        "model=mlp",
        "model.hidden=[24,24]",
        "workers=sync",
        "optimizer.factor_update_every=2",
        "optimizer.inverse_update_every=4",
    ],
}


def overrides(case: str, run_dir: Path, data_root: Path) -> list[str]:
    return [
        f"trainer.run_dir={run_dir}",
        f"data.root={data_root}",
        "data.num_samples=1200",
        "data.progress=false",
        "data.batch_size=64",
        "trainer.max_steps=10",
        "trainer.eval_every=5",
        "trainer.log_every=5",
        "trainer.progress=false",
        "trainer.threads=1",
        "logger=none",
        *CASES[case],
    ]


def digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run_case(case: str, work: Path, data_root: Path | None = None) -> dict[str, Any]:
    from hydra import compose, initialize_config_module

    from secondorder.train import run

    with initialize_config_module(config_module="secondorder.configs", version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=overrides(case, work / case, data_root or work / "data")
        )
    summary = run(cfg)
    weights = torch.load(Path(summary["run_dir"]) / "final_model.pt", weights_only=True)
    return {
        "final_train_loss": float(summary["final_train_loss"]).hex(),
        "final_eval_loss": float(summary["final_eval_loss"]).hex(),
        "weights": digest(weights),
    }


def run_all(cases: list[str] | None = None) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return {case: run_case(case, Path(tmp)) for case in cases or list(CASES)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {REFERENCE.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = run_all()
    text = json.dumps(results, indent=1, sort_keys=True) + "\n"
    if args.write:
        REFERENCE.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
