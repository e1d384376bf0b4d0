"""The table-tennis preset over seeds: how much of notebook 03's result is the seed.

    .venv/bin/python benchmarks/pong_seeds.py                 # seeds 0 1 2, about 5 minutes each here
    .venv/bin/python benchmarks/pong_seeds.py --seeds 0 --epochs 5

Trains preset("pong") (latent 5+5+4+3+2+1, f=2, 20 epochs) on the same 5,000 frames as the
notebooks, once per seed, and reports per seed: the held-out MSE per pixel (last epoch, and the
best epoch), the per-frame training and test reconstruction error of the last epoch (the
overfitting gap), the share of held-out reconstructions whose paddles and ball read back within
4 field pixels of the RAM truth, and the held-out R^2 of each position factor from the whole
latent. Prints a table and writes benchmarks/results/pong_seeds.json.
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

POSITIONS = ("ball_x", "ball_y", "player_y", "opponent_y")


def run(seed: int, data: pvae.ImageData, epochs: int) -> dict:
    config = pvae.preset("pong", epochs=epochs)
    pvae.set_seed(seed)
    model = pvae.PartitionVAE(config)
    h = pvae.train(model, data.x_train, data.x_test, progress=False)
    model.eval()
    readback = pvae.pong_readback_accuracy(pvae.reconstruct(model, data.x_test), data.y_test)
    columns = [pvae.PONG_FACTORS.index(f) for f in POSITIONS]
    r2 = pvae.factor_r2_map(pvae.latent_means(model, data.x_train), data.y_train[:, columns].numpy(),
                            pvae.latent_means(model, data.x_test), data.y_test[:, columns].numpy(),
                            config.partitions)[-1]
    pixels = data.x_test[0].numel()
    return {"test_mse": h["test_mse"][-1], "best_test_mse": min(h["test_mse"]),
            "best_epoch": int(np.argmin(h["test_mse"])) + 1, "test_kl": h["test_kl"][-1],
            "train_recon": h["train_recon"][-1], "test_recon": h["test_mse"][-1] * pixels,
            "within_4px": {k: v["within"] for k, v in readback.items()},
            "r2_whole_latent": dict(zip(POSITIONS, r2.tolist())), "seconds": sum(h["seconds"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=pvae.preset("pong").epochs)
    args = parser.parse_args()
    data = pvae.load_table_tennis()
    if data.label_names != pvae.PONG_FACTORS:
        sys.exit(f"pong_seeds: needs Pong frames with RAM truth; load_table_tennis gave {data.source}")
    results = {"data": data.source, "epochs": args.epochs, "seeds": args.seeds, "per_seed": {}}
    print(f"{'seed':>4s} {'MSE last':>9s} {'best (ep)':>12s} {'KL':>6s} {'recon tr/te':>12s} "
          f"{'player':>7s} {'opp.':>6s} {'ball':>6s}  R2 ball x/y, player, opponent   s")
    for seed in args.seeds:
        r = run(seed, data, args.epochs)
        results["per_seed"][seed] = r
        w, q = r["within_4px"], r["r2_whole_latent"]
        print(f"{seed:4d} {r['test_mse']:9.5f} {r['best_test_mse']:8.5f} ({r['best_epoch']:2d}) "
              f"{r['test_kl']:6.1f} {r['train_recon']:5.2f}/{r['test_recon']:5.2f} "
              f"{w['player_y']:7.1%} {w['opponent_y']:6.1%} {w['ball']:6.1%}  "
              + " ".join(f"{q[f]:.2f}" for f in POSITIONS) + f"  {r['seconds']:.0f}", flush=True)
    runs = list(results["per_seed"].values())
    summary = {"test_mse": [r["test_mse"] for r in runs],
               **{f"within_4px_{k}": [r["within_4px"][k] for r in runs] for k in runs[0]["within_4px"]},
               **{f"r2_{k}": [r["r2_whole_latent"][k] for r in runs] for k in POSITIONS}}
    results["mean_sd"] = {k: [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0]
                          for k, v in summary.items()}
    print("mean ± sd: " + ", ".join(f"{k} {m:.4g} ± {s:.2g}" for k, (m, s) in results["mean_sd"].items()))
    write_results(results, "pong_seeds")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
