"""The CPU fast path of train(), head to head: channels-last conv weights and fused Adam
against PyTorch's defaults, one full epoch per run, runs alternated in fresh processes.

    .venv/bin/python benchmarks/bench_cpu_path.py               # about 5 minutes here
    .venv/bin/python benchmarks/bench_cpu_path.py --repeats 1 --only mnist

bench_train.py's "cpu" group gives each setting one short run; on a shared machine that is
noisy. Here every combination of layout (contiguous / channels-last) and Adam kernel (for-loop
/ fused) trains one epoch of the MNIST default (batch 32) and of the table-tennis preset, then
evaluates the test set, in a fresh process each; the combinations take turns, ``--repeats``
times, and the table gives the median. It also times 2x2 max-pooling, forward, in both layouts.
Prints a table and writes benchmarks/results/bench_cpu_path.json. Nothing here asserts.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pvae_utils as pvae  # noqa: E402
from results_io import write_results  # noqa: E402

COMBOS = {"PyTorch's defaults": (False, False), "channels-last only": (True, False),
          "fused Adam only": (False, True), "both (train's default)": (True, True)}


def run_one(preset: str, channels_last: bool, fused: bool) -> dict:
    """One epoch of ``preset`` after 5 warm-up steps, then one evaluation of the test set."""
    data = pvae.load_mnist(verbose=False) if preset == "mnist" else pvae.load_table_tennis(verbose=False)
    config = pvae.preset(preset)
    pvae.set_seed(0)
    model = pvae.place(pvae.PartitionVAE(config), "cpu", channels_last)
    opt = pvae.make_optimizer(model, fused)
    x = data.x_train
    for i in range(5):
        pvae.train_step(model, opt, x[i * config.batch_size:(i + 1) * config.batch_size])
    start = time.perf_counter()
    for idx in torch.randperm(len(x)).split(config.batch_size):
        pvae.train_step(model, opt, x[idx])
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    pvae.evaluate(model, data.x_test)
    eval_s = time.perf_counter() - start
    return {"train_images_per_s": len(x) / train_s, "eval_images_per_s": len(data.x_test) / eval_s}


def max_pool_ms(repeats: int = 50) -> dict:
    """Milliseconds per 2x2 max-pool (with indices, as in training) of (64, 32, 28, 28) maps."""
    x = torch.rand(64, 32, 28, 28)
    out = {}
    for name, t in (("contiguous", x), ("channels-last", x.contiguous(memory_format=torch.channels_last))):
        for _ in range(5):
            torch.nn.functional.max_pool2d_with_indices(t, 2)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.max_pool2d_with_indices(t, 2)
        out[name] = (time.perf_counter() - start) / repeats * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["mnist", "pong"])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        preset, layout, kernel = args.worker
        print(json.dumps(run_one(preset, layout == "1", kernel == "1")))
        return
    presets = [args.only] if args.only else ["mnist", "pong"]
    runs = {p: {name: [] for name in COMBOS} for p in presets}
    for _ in range(args.repeats):
        for preset in presets:
            for name, (layout, kernel) in COMBOS.items():
                out = subprocess.run([sys.executable, __file__, "--worker", preset, str(int(layout)),
                                      str(int(kernel))], capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    sys.exit(f"run {preset} {name} failed:\n{out.stderr[-2000:]}")
                runs[preset][name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "runs": runs, "median": {}, "max_pool_ms": max_pool_ms()}
    print(f"{'preset':6s} {'setting':24s} {'train img/s':>11s} {'vs defaults':>11s} {'eval img/s':>10s} "
          f"{'vs defaults':>11s}   per run (train)")
    for preset, by_name in runs.items():
        med = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in by_name.items()}
        report["median"][preset] = med
        base = med["PyTorch's defaults"]
        for name, m in med.items():
            print(f"{preset:6s} {name:24s} {m['train_images_per_s']:11.0f} "
                  f"{m['train_images_per_s'] / base['train_images_per_s']:10.2f}x "
                  f"{m['eval_images_per_s']:10.0f} {m['eval_images_per_s'] / base['eval_images_per_s']:10.2f}x   "
                  + " ".join(f"{r['train_images_per_s']:.0f}" for r in by_name[name]))
    mp = report["max_pool_ms"]
    print(f"2x2 max-pool of (64, 32, 28, 28): contiguous {mp['contiguous']:.2f} ms, "
          f"channels-last {mp['channels-last']:.2f} ms")
    write_results(report, "bench_cpu_path")


if __name__ == "__main__":
    main()
