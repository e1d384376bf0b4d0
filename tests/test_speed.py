"""The GPU code paths (mixed precision, gradient scaling, torch.compile switch) exercised on the CPU,
and the data path the speed issue asks for: tensors on the device, batches by indexing."""
import pytest
import torch

import pvae_utils as pvae


def test_autocast_dtype_chooses_per_device_and_names_bad_values():
    cpu = torch.device("cpu")
    assert pvae.autocast_dtype(cpu, "auto") is None            # float32 on every CPU (README)
    assert pvae.autocast_dtype(cpu, "off") is None
    assert pvae.autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert pvae.autocast_dtype(cpu, "fp16") is torch.float16
    with pytest.raises(ValueError, match=r"amp: got 'half'; expected one of \('auto', 'off', 'bf16', 'fp16'\)"):
        pvae.autocast_dtype(cpu, "half")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_with_float32_loss_sums(tiny_config, images, amp):
    """Forced autocast on the CPU: the loss terms come back float32 and finite, the weights stay
    float32, the held-out loss falls, and fp16 goes through a gradient scaler."""
    config = tiny_config.replace(epochs=4, lr=3e-3)
    x = images(config, n=64)
    model = pvae.PartitionVAE(config)
    before = pvae.evaluate(model, x[:16])["loss"]
    history = pvae.train(model, x, x[:16], progress=False, amp=amp)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert history["test_loss"][-1] < before
    dtype = pvae.autocast_dtype(torch.device("cpu"), amp)
    with pvae._autocast(torch.device("cpu"), dtype):
        x_hat, mu, logvar = model(x[:4])
    assert x_hat.dtype == dtype                             # the forward really ran in low precision
    terms = pvae.pvae_loss(x[:4], x_hat, mu, logvar, config)
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    low = pvae.evaluate(model, x[:16], amp=amp)["mse"]
    assert low == pytest.approx(pvae.evaluate(model, x[:16])["mse"], rel=0.05)


def test_train_step_with_a_scaler_updates_every_parameter(tiny_config, images):
    model = pvae.PartitionVAE(tiny_config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu")
    x = images(tiny_config, n=8)
    for _ in range(20):   # the scaler skips the steps whose fp16 gradients overflow, and backs off
        terms = pvae.train_step(model, opt, x, dtype=torch.float16, scaler=scaler)
    assert terms.shape == (3,) and torch.isfinite(terms).all()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_compiled_training_matches_eager_training(tiny_config, images):
    """compile=True is an option, not a different model: same losses as eager, to rounding."""
    pytest.importorskip("torch._dynamo")
    x = images(tiny_config, n=16)
    runs = []
    for compile in (False, True):
        pvae.set_seed(0)
        model = pvae.PartitionVAE(tiny_config.replace(epochs=1))
        runs.append(pvae.train(model, x, x[:8], progress=False, compile=compile)["test_loss"][0])
    assert runs[1] == pytest.approx(runs[0], rel=1e-3)


def test_the_cpu_fast_path_is_the_same_training_to_rounding(tiny_config, images):
    """place() (channels-last conv weights on the CPU) and make_optimizer() (fused Adam there)
    change the speed, not the model: 10 steps from the same start give the weights and losses
    of PyTorch's default layout and for-loop Adam, to float32 rounding."""
    x = images(tiny_config, n=32)
    runs = []
    for fast in (True, False):
        pvae.set_seed(0)
        model = pvae.place(pvae.PartitionVAE(tiny_config), "cpu", channels_last=fast)
        opt = pvae.make_optimizer(model, fused=fast)
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        layout = torch.channels_last if fast else torch.contiguous_format
        assert all(w.is_contiguous(memory_format=layout) for w in convs)
        assert any(w.is_contiguous() != fast for w in convs)    # some weight really differs
        assert opt.defaults["fused"] == (True if fast else None)
        losses = [pvae.train_step(model, opt, x[i % 4 * 8:(i % 4 + 1) * 8])[0].item() for i in range(10)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4)
    for fast, slow in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_train_and_load_use_the_fast_path_and_checkpoints_move_between_layouts(tiny_config, images, tmp_path):
    x = images(tiny_config, n=16)
    model = pvae.PartitionVAE(tiny_config.replace(epochs=1))
    pvae.train(model, x, x[:8], progress=False, checkpoint_path=tmp_path / "m.pt")
    assert model.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    loaded, _ = pvae.load_checkpoint(tmp_path / "m.pt")
    assert loaded.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = pvae.place(pvae.PartitionVAE(tiny_config.replace(epochs=1)), "cpu", channels_last=False)
    pvae.load_checkpoint(tmp_path / "m.pt", model=plain)     # a channels-last file into a plain model
    torch.testing.assert_close(pvae.reconstruct(plain, x[:4]), pvae.reconstruct(loaded, x[:4]))


def test_the_benchmark_runs_and_writes_its_json(tmp_path):
    """benchmarks/bench_train.py end to end on a tiny budget (its numbers are not checked here:
    a benchmark is not a timed test), both data pipelines, one fresh process per run."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--budget", "1", "--only", "mnist", "--groups", "pipeline", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_train_cpu.json").read_text())
    runs = saved["groups"]["pipeline"]
    assert len(runs) == 2 and saved["pipeline_speedup"] == pytest.approx(report["pipeline_speedup"])
    for r in runs.values():
        assert r["train_images_per_s"] > 0 and r["peak_memory_mb"] > 50 and 0 < r["test_mse"] < 1
        assert r["data_only_images_per_s"] > 0        # speeds are reported, not asserted: not a timed test
    assert saved["pipeline_data_only_speedup"] == pytest.approx(
        runs["report MNIST, batch 64, tensor"]["data_only_images_per_s"]
        / runs["report MNIST, batch 64, dataloader"]["data_only_images_per_s"])
