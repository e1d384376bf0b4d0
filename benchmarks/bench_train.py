"""Training speed and the subresolution trade-off, measured side by side.

    .venv/bin/python benchmarks/bench_train.py                    # CPU, about 15 minutes here
    .venv/bin/python benchmarks/bench_train.py --device cuda      # a GPU (tools/gpu_bench.sh)
    .venv/bin/python benchmarks/bench_train.py --budget 5 --only mnist   # a quick look

Every run is a fresh subprocess (so its peak memory is its own) that trains one configuration
for a fixed wall-clock budget from seed 0 and reports: training and evaluation images per
second, seconds per epoch of the training set, peak memory (process RSS on the CPU, max
allocated on CUDA), the held-out MSE per pixel after the budget, and the held-out MSE at points
along the way (for the loss-curve figure). Runs:

  tradeoff     the MNIST default and the table-tennis preset, f in {1, 2, 4} x both upsampling modes
  pipeline     the report's MNIST architecture at batch 64: our data path (tensors on the device,
               batches by indexing, noise on the device) against the conventional one (a
               torchvision-style dataset with a PIL image and ToTensor per item, a DataLoader),
               in training and for the data alone (batches made, no model)
  variants     the report's Figure 9: latent 6 / 10 / 20 at f = 2, and without subresolution
  cpu          what helps on a CPU: the layout and Adam kernel that train() picks against
               PyTorch's defaults, threads, bf16, batch size, torch.compile (on CUDA: AMP,
               channels-last, fused Adam, batch size, torch.compile)

Prints a table per group and writes benchmarks/results/bench_train_<device>.json,
figures/subresolution_tradeoff.png and figures/report_variants_loss.png (CPU runs; a GPU run
writes its figures with a _cuda suffix). Benchmarks are not tests: nothing here asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pvae_utils as pvae  # noqa: E402

MNIST_LATENTS = {6: (2, 2, 2), 10: (4, 3, 3), 20: (7, 7, 6)}


# ------------------------------------------------------------------------------ one run (worker)

class ConventionalMNIST(torch.utils.data.Dataset):
    """The conventional pipeline, as torchvision's datasets do it: uint8 images (N, H, W) kept
    on the host, each item made a PIL image and converted by ToTensor (1, H, W) in [0, 1]."""

    def __init__(self, images: np.ndarray):
        from torchvision import transforms
        self.images, self.to_tensor = images, transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.to_tensor(Image.fromarray(self.images[i]))


def _batches(spec: dict, x_train: torch.Tensor, batch_size: int, device: torch.device):
    """Endless batches (B, C, H, W) on the device, from the pipeline the spec names."""
    if spec.get("pipeline", "tensor") == "tensor":
        while True:
            for idx in torch.randperm(len(x_train), device=device).split(batch_size):
                yield x_train[idx]
    images = (x_train[:, 0].cpu().numpy() * 255).round().astype(np.uint8)
    loader = torch.utils.data.DataLoader(ConventionalMNIST(images), batch_size=batch_size,
                                         shuffle=True, num_workers=0)
    while True:
        for xb in loader:
            yield xb.to(device, non_blocking=True)


def _data_only(batches, n_train: int, device: torch.device, seconds: float = 2.0) -> float:
    """Images per second of the data path alone (batches made and on the device, no model),
    over whole epochs until ``seconds`` have passed."""
    _sync(device)
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        epoch = 0
        while epoch < n_train:
            epoch += len(next(batches))
        images += epoch
    _sync(device)
    return images / (time.perf_counter() - start)


def _load(spec: dict) -> pvae.ImageData:
    if spec["preset"].startswith("mnist"):
        return pvae.load_mnist(verbose=False)
    return pvae.load_table_tennis(verbose=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(spec: dict) -> dict:
    """Train spec's configuration for spec["budget"] seconds of training time; see the module
    docstring for what is measured."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    data = _load(spec)
    config = pvae.preset(spec["preset"], **spec.get("changes", {}))
    pvae.set_seed(0)
    model = pvae.place(pvae.PartitionVAE(config), device, spec.get("channels_last"))
    x_train, x_test = data.x_train.to(device), data.x_test.to(device)
    opt = pvae.make_optimizer(model, spec.get("fused"))      # None: what train() uses
    dtype = pvae.autocast_dtype(device, spec.get("amp", "auto"))
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    runner = torch.compile(model) if spec.get("compile") else model
    batches = _batches(spec, x_train, config.batch_size, device)
    data_ips = _data_only(batches, len(x_train), device) if "pipeline" in spec else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    budget, warmup = spec["budget"], spec.get("warmup_steps", 5)
    checkpoints = np.linspace(budget / spec.get("curve_points", 8), budget, spec.get("curve_points", 8))
    curve, trained, images, steps, step_log = [], 0.0, 0, 0, []
    model.train()
    _sync(device)
    start = time.perf_counter()
    for _ in range(warmup):          # compilation and first-call costs: not in the budget
        pvae.train_step(runner, opt, next(batches), dtype=dtype, scaler=scaler, where="warm-up")
    _sync(device)
    warmup_seconds = time.perf_counter() - start
    while trained < budget:
        _sync(device)
        start = time.perf_counter()
        xb = next(batches)
        pvae.train_step(runner, opt, xb, dtype=dtype, scaler=scaler, where=f"step {steps}")
        _sync(device)
        seconds = time.perf_counter() - start
        trained, images, steps = trained + seconds, images + len(xb), steps + 1
        step_log.append((len(xb), seconds))
        if len(curve) < len(checkpoints) and trained >= checkpoints[len(curve)]:
            curve.append([trained, images, pvae.evaluate(model, x_test, amp=spec.get("amp", "auto"))["mse"]])
            model.train()
    eval_seconds = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        final = pvae.evaluate(model, x_test, amp=spec.get("amp", "auto"))
        _sync(device)
        eval_seconds.append(time.perf_counter() - start)
    timed = np.array(step_log)
    train_ips = timed[:, 0].sum() / timed[:, 1].sum()
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"train_images_per_s": train_ips, "eval_images_per_s": len(x_test) / min(eval_seconds),
            "seconds_per_epoch": len(x_train) / train_ips, "seconds_per_60k": 60000 / train_ips,
            "peak_memory_mb": peak / 2 ** 20, "test_mse": final["mse"], "test_kl": final["kl"],
            "data_only_images_per_s": data_ips, "warmup_steps": warmup, "warmup_seconds": warmup_seconds,
            "trained_seconds": trained, "images_seen": images, "epochs_seen": images / len(x_train),
            "curve": curve, "n_train": len(x_train), "data": data.source,
            "floor_mse": pvae.subres_floor_mse(data.x_test, config.subres_factor, config.upsample_mode)}


# ------------------------------------------------------------------------------ the grid

def specs(args) -> dict:
    """Every run of the benchmark, by group: {group: {name: spec}}."""
    base = {"device": args.device, "budget": args.budget}
    groups = {"tradeoff": {}, "pipeline": {}, "variants": {}, "cpu": {}}
    for preset, scale in (("mnist", 1), ("pong", args.pong_scale)):
        for f in (1, 2, 4):
            for mode in ("nearest-exact", "bilinear"):
                groups["tradeoff"][f"{preset} f={f} {mode}"] = {
                    **base, "preset": preset, "budget": args.budget * scale,
                    "changes": {"subres_factor": f, "upsample_mode": mode}}
    for pipeline in ("tensor", "dataloader"):
        groups["pipeline"][f"report MNIST, batch 64, {pipeline}"] = {
            **base, "preset": "mnist_report", "pipeline": pipeline, "budget": args.budget / 2}
    for latent, parts in MNIST_LATENTS.items():
        groups["variants"][f"latent {latent}, f=2"] = {**base, "preset": "mnist", "changes": {"partitions": parts}}
    groups["variants"]["latent 10, f=1 (no subresolution)"] = {**base, "preset": "mnist", "changes": {"subres_factor": 1}}
    short = {**base, "preset": "mnist", "budget": args.budget / 2}
    if args.device == "cpu":
        groups["cpu"] = {"default: channels-last, fused Adam": short,
                         "contiguous layout": {**short, "channels_last": False},
                         "for-loop Adam": {**short, "fused": False},
                         "neither (PyTorch's defaults)": {**short, "channels_last": False, "fused": False},
                         "1 thread": {**short, "threads": 1},
                         "bf16 autocast": {**short, "amp": "bf16"},
                         "batch 64": {**short, "changes": {"batch_size": 64}},
                         "batch 128": {**short, "changes": {"batch_size": 128}},
                         "torch.compile": {**short, "compile": True, "warmup_steps": 20}}
    else:
        groups["cpu"] = {"amp auto (default)": short, "amp off (float32)": {**short, "amp": "off"},
                         "channels-last": {**short, "channels_last": True},
                         "fused Adam": {**short, "fused": True},
                         "batch 256": {**short, "changes": {"batch_size": 256}},
                         "torch.compile": {**short, "compile": True, "warmup_steps": 20}}
    if args.only:
        groups = {g: {n: s for n, s in runs.items() if s["preset"].startswith(args.only)}
                  for g, runs in groups.items()}
    return groups


def launch(spec: dict) -> dict:
    """run_one in a fresh Python process; its result is the last line it prints."""
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"benchmark run {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(group: str, results: dict) -> None:
    print(f"\n{group}")
    print(f"{'run':38s} {'train img/s':>11s} {'eval img/s':>10s} {'s/epoch':>8s} {'s/60k':>7s} "
          f"{'peak MB':>8s} {'MSE@budget':>10s} {'floor':>7s} {'epochs':>6s}")
    for name, r in results.items():
        print(f"{name:38s} {r['train_images_per_s']:11.0f} {r['eval_images_per_s']:10.0f} "
              f"{r['seconds_per_epoch']:8.2f} {r['seconds_per_60k']:7.1f} {r['peak_memory_mb']:8.0f} "
              f"{r['test_mse']:10.5f} {r['floor_mse']:7.4f} {r['epochs_seen']:6.1f}", flush=True)


# ------------------------------------------------------------------------------ figures

def plot_tradeoff(results: dict, path: Path) -> None:
    """Seconds per epoch and held-out MSE after the budget against f, per config and mode, with
    the interpolation floor (the input down- and up-sampled) as dashed lines."""
    import matplotlib.pyplot as plt
    presets = sorted({name.split()[0] for name in results}, key=["mnist", "pong"].index)
    fig, axes = plt.subplots(2, len(presets), figsize=(5.5 * len(presets), 7), squeeze=False)
    for col, preset in enumerate(presets):
        for mode, colour in (("nearest-exact", "tab:blue"), ("bilinear", "tab:orange")):
            runs = [(int(n.split("f=")[1].split()[0]), r) for n, r in results.items()
                    if n.startswith(preset + " ") and n.endswith(mode)]
            fs = [f for f, _ in runs]
            axes[0, col].plot(fs, [r["seconds_per_epoch"] for _, r in runs], "o-", color=colour, label=mode)
            axes[1, col].plot(fs, [r["test_mse"] for _, r in runs], "o-", color=colour,
                              label=f"{mode}: model after {runs[0][1]['trained_seconds']:.0f} s")
            floor = [(f, r["floor_mse"]) for f, r in runs if f > 1]   # f=1: 0, off a log axis
            axes[1, col].plot(*zip(*floor), "--", color=colour,
                              label=f"{mode}: floor (input down+up-sampled; 0 at f=1)")
        n = next(r["n_train"] for name, r in results.items() if name.startswith(preset + " "))
        axes[0, col].set(title=f"{preset}: time per epoch ({n} images)", ylabel="seconds per epoch",
                         xticks=[1, 2, 4], ylim=(0, None))
        axes[1, col].set(title=f"{preset}: held-out MSE after the same time", xlabel="subresolution factor f",
                         ylabel="MSE per pixel", xticks=[1, 2, 4], yscale="log")
        axes[0, col].legend(fontsize=8)
        axes[1, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variants(results: dict, path: Path) -> None:
    """The report's Figure 9: held-out MSE against training time for each variant."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in results.items():
        curve = np.array(r["curve"])
        ax.plot(curve[:, 0], curve[:, 2], "o-", ms=3, label=name)
    ax.set(xlabel="training seconds", ylabel="held-out MSE per pixel", yscale="log",
           title="MNIST variants (report Fig. 9), same time budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return pvae.platform.processor() or "cpu"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budget", type=float, default=20.0, help="training seconds per MNIST run")
    parser.add_argument("--pong-scale", type=float, default=3.0, help="table-tennis budget / MNIST budget")
    parser.add_argument("--only", choices=["mnist", "pong"], help="run only this data set's runs")
    parser.add_argument("--groups", nargs="+", default=["tradeoff", "pipeline", "variants", "cpu"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no usable CUDA GPU")
    report = {"device": args.device, "torch": torch.__version__, "budget_s": args.budget,
              "machine": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
              "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(),
              "groups": {}}
    if args.device == "cpu" and os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.1f} at start: other work shares the CPU, "
              "and the speeds will show it")
    for group, runs in specs(args).items():
        if group not in args.groups or not runs:
            continue
        report["groups"][group] = {name: {**launch(spec), "spec": spec} for name, spec in runs.items()}
        print_table(group, report["groups"][group])
    pipe = report["groups"].get("pipeline", {})
    if len(pipe) == 2:
        tensor, loader = pipe.values()
        report["pipeline_speedup"] = tensor["train_images_per_s"] / loader["train_images_per_s"]
        report["pipeline_data_only_speedup"] = (tensor["data_only_images_per_s"]
                                                / loader["data_only_images_per_s"])
        print(f"\nour data path / conventional pipeline: {report['pipeline_speedup']:.2f}x images "
              f"per second in training; the data alone (no model) "
              f"{tensor['data_only_images_per_s']:.0f} / {loader['data_only_images_per_s']:.0f} = "
              f"{report['pipeline_data_only_speedup']:.2f}x")
    trade = report["groups"].get("tradeoff", {})
    for preset in ("mnist", "pong"):
        for mode in ("nearest-exact", "bilinear"):
            one, two = (trade.get(f"{preset} f={f} {mode}") for f in (1, 2))
            if one and two:
                ratio = two["seconds_per_epoch"] / one["seconds_per_epoch"]
                report.setdefault("f2_over_f1_epoch_time", {})[f"{preset} {mode}"] = ratio
                print(f"{preset} {mode}: epoch time f=2 / f=1 = {ratio:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bench_train_{args.device}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    written = [out]
    if trade:
        written.append(ROOT / "figures" / f"subresolution_tradeoff{suffix}.png")
        plot_tradeoff(trade, written[-1])
    if report["groups"].get("variants"):
        written.append(ROOT / "figures" / f"report_variants_loss{suffix}.png")
        plot_variants(report["groups"]["variants"], written[-1])
    print("wrote " + ", ".join(str(p) for p in written))
    if args.budget < 5:
        print(f"note: --budget {args.budget:g} s times only a few steps per run; the speeds above "
              "are smoke-test numbers, not measurements")
    return report


if __name__ == "__main__":
    main()
