"""Reliability: interrupted runs resume exactly, NaNs stop training, random configurations."""
import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pvae_utils as pvae

ALL_BUT_TIME = [k for k in pvae.HISTORY_KEYS if k != "seconds"]


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_an_interrupted_run_resumed_ends_exactly_like_an_uninterrupted_one(tiny_config, images,
                                                                           tmp_path):
    cfg = tiny_config.replace(epochs=3)
    x_train, x_test = images(cfg, 24), images(cfg, 6, seed=1)

    pvae.set_seed(7)
    straight = pvae.PartitionVAE(cfg)
    full = pvae.train(straight, x_train, x_test, device="cpu", progress=False,
                      checkpoint_path=tmp_path / "straight.pt")

    pvae.set_seed(7)
    first = pvae.PartitionVAE(cfg)
    pvae.train(first, x_train, x_test, epochs=1, device="cpu", progress=False,
               checkpoint_path=tmp_path / "run.pt")          # "the runtime disconnects" here
    pvae.set_seed(12345)                                      # a new session: other random state
    resumed_model = pvae.PartitionVAE(cfg)
    resumed = pvae.train(resumed_model, x_train, x_test, device="cpu", progress=False,
                         checkpoint_path=tmp_path / "run.pt", resume=True)

    assert {k: resumed[k] for k in ALL_BUT_TIME} == {k: full[k] for k in ALL_BUT_TIME}
    a, b = weights(straight), weights(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_configuration(tiny_config, images, tmp_path):
    path = tmp_path / "run.pt"
    pvae.train(pvae.PartitionVAE(tiny_config), images(tiny_config, 8), images(tiny_config, 4),
               epochs=1, device="cpu", progress=False, checkpoint_path=path)
    before = path.read_bytes()
    other = pvae.PartitionVAE(tiny_config.replace(partitions=(3, 3), lr=0.01))
    with pytest.raises(ValueError, match=r"another configuration.*'partitions'.*'lr'"):
        pvae.train(other, images(tiny_config, 8), images(tiny_config, 4), device="cpu",
                   progress=False, checkpoint_path=path, resume=True)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_path"):
        pvae.train(other, images(tiny_config, 8), images(tiny_config, 4), resume=True)


def test_a_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tiny_config, images,
                                                                             tmp_path):
    path = tmp_path / "run.pt"
    model = pvae.PartitionVAE(tiny_config)
    pvae.train(model, images(tiny_config, 16), images(tiny_config, 4), epochs=1, device="cpu",
               progress=False, checkpoint_path=path)
    before = path.read_bytes()
    with torch.no_grad():  # a weight blows up, as with a far too large learning rate
        model.decoder_conv[-2].weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"non-finite recon \(nan\) at epoch 1, batch 1 of 2"):
        pvae.train(model, images(tiny_config, 16), images(tiny_config, 4), device="cpu",
                   progress=False, checkpoint_path=path)
    assert path.read_bytes() == before


def test_a_non_finite_kl_is_named(tiny_config, images):
    model = pvae.PartitionVAE(tiny_config)
    with torch.no_grad():
        model.mu_heads[1][-1].bias.fill_(float("nan"))
    before = weights(model)
    with pytest.raises(FloatingPointError, match=r"non-finite kl \(nan\) at epoch 1, batch 1"):
        pvae.train(model, images(tiny_config, 16), images(tiny_config, 4), device="cpu",
                   progress=False)
    after = weights(model)  # no update happened: no NaN spread into the other weights
    assert all(torch.equal(before[k], after[k]) or not torch.isfinite(before[k]).all() for k in before)


@pytest.mark.parametrize("autocast", [False, True])
def test_extreme_inputs_and_weights_give_finite_loss_and_gradients(tiny_config, autocast):
    model = pvae.PartitionVAE(tiny_config.replace(logvar_limit=10.0))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(50.0)  # extreme initial weights
    x = torch.ones(4, 1, 16, 16)  # saturated input
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x_hat, mu, logvar = model(x)
        terms = pvae.pvae_loss(x, x_hat, mu, logvar, model.config)
    assert terms["kl"].dtype == torch.float32  # sums stay in float32 under autocast
    assert logvar.abs().max() <= 10.0
    terms["loss"].backward()
    assert math.isfinite(terms["loss"].item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_image_data_checks_labels_against_images():
    x = torch.rand(5, 1, 8, 8)
    with pytest.raises(ValueError, match=r"ImageData.y_test: got shape \(4,\) for 5 images"):
        pvae.ImageData(x, torch.zeros(5), x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"ImageData.x_train: got shape \(5, 64\)"):
        pvae.ImageData(x.flatten(1), torch.zeros(5), x, torch.zeros(5))


def test_older_format_version_and_existing_model_of_another_config(tiny_config, tmp_path):
    path = pvae.save_checkpoint(tmp_path / "run.pt", pvae.PartitionVAE(tiny_config))
    torch.save({**torch.load(path, weights_only=True), "version": 0}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="version 0, an older format; this code reads version 1"):
        pvae.load_checkpoint(tmp_path / "old.pt")
    other = pvae.PartitionVAE(tiny_config.replace(decoder_channels=6, subres_factor=4))
    with pytest.raises(ValueError, match=r"another configuration.*'decoder_channels': \(4, 6\)"
                                         r".*'subres_factor': \(2, 4\)"):
        pvae.load_checkpoint(path, model=other)
    same = pvae.PartitionVAE(tiny_config)
    assert pvae.load_checkpoint(path, model=same)[0] is same


# --- property-based: random valid configurations work, random invalid ones say why ------------

@st.composite
def valid_configs(draw):
    encoder = tuple(draw(st.lists(st.tuples(st.sampled_from([1, 3, 5]), st.integers(1, 6)),
                                  max_size=3)))
    f = draw(st.sampled_from([1, 2, 4]))
    smallest = max(2 ** len(encoder), f)
    sizes = st.integers(1, 12).map(lambda k: f * k).filter(lambda s: s >= smallest)
    return pvae.PVAEConfig(
        image_size=(draw(sizes), draw(sizes)), in_channels=draw(st.integers(1, 3)),
        encoder=encoder, partitions=tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))),
        head_hidden=tuple(draw(st.lists(st.integers(1, 8), max_size=2))),
        decoder_linear=tuple(draw(st.lists(st.integers(1, 16), max_size=2))),
        decoder_channels=draw(st.integers(1, 4)),
        decoder_convs=tuple(draw(st.lists(st.tuples(st.sampled_from([1, 3]), st.integers(1, 4)),
                                          max_size=2))),
        subres_factor=f, upsample_mode=draw(st.sampled_from(pvae.UPSAMPLE_MODES)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(config=valid_configs(), batch=st.integers(1, 3))
def test_random_valid_configurations_give_right_shapes_and_finite_loss(config, batch):
    model = pvae.PartitionVAE(config)
    x = torch.rand(batch, config.in_channels, *config.image_size)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape and mu.shape == (batch, config.latent_dim)
    assert math.isfinite(pvae.pvae_loss(x, x_hat, mu, logvar, config)["loss"].item())
    assert pvae.PVAEConfig.from_dict(config.to_dict()) == config


BAD_VALUES = {
    "image_size": [(0, 8), (8,), 8, (8.0, 8), "28x28", (-8, 8)],
    "in_channels": [0, -1, 1.5, True, None],
    "encoder": [((2, 4),), ((3, 0),), ((3,),), (3, 4), "conv"],
    "partitions": [(), (0,), (3, -1), (2.5,), None, 10],
    "head_hidden": [(0,), (-4,), (1.5,), 8],
    "decoder_linear": [(0,), (2.0,), "wide"],
    "decoder_channels": [0, 2.5, None],
    "decoder_convs": [((4, 4),), ((3, -1),)],
    "subres_factor": [0, -2, 1.5, None],  # (a non-divisor: tests/test_config.py)
    "upsample_mode": ["cubic", "", None, 2],
    "recon_weight": [0, -1, float("nan"), float("inf"), "1"],
    "kl_weight": [-0.1, float("nan"), None],
    "noise_std": [-0.01, float("inf")],
    "logvar_limit": [0, -5, float("nan")],
    "lr": [0, -1e-3, float("nan")],
    "batch_size": [0, -1, 2.0, False],
    "epochs": [-1, 1.5, True],
}


@settings(max_examples=80, deadline=None)
@given(config=valid_configs(), data=st.data())
def test_random_invalid_configurations_raise_value_error_naming_the_field(config, data):
    field = data.draw(st.sampled_from(sorted(BAD_VALUES)))
    value = data.draw(st.sampled_from(BAD_VALUES[field]))
    with pytest.raises(ValueError) as err:
        pvae.PVAEConfig(**{**config.to_dict(), field: value})
    text = str(err.value)
    assert "got" in text and "expected" in text
    # the field named is the bad one, or (for sizes) the one it conflicts with
    assert f"PVAEConfig.{field}" in text or (
        field in ("image_size", "subres_factor", "encoder")
        and ("PVAEConfig.image_size" in text or "PVAEConfig.subres_factor" in text))


# --- image folders: a user's download, with the usual faults ---------------------------------

def write_pngs(folder, n, size=(20, 30)):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")


def test_image_folder_loads_resizes_and_splits(tmp_path):
    write_pngs(tmp_path / "tt", 10)
    data = pvae.load_image_folder(tmp_path / "tt", (16, 24))
    assert data.x_train.shape == (9, 3, 16, 24) and data.x_test.shape == (1, 3, 16, 24)
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1 and (data.y_train == -1).all()
    grey = pvae.load_image_folder(tmp_path / "tt", (8, 8), grayscale=True, test_fraction=0.3)
    assert grey.x_train.shape == (7, 1, 8, 8) and grey.x_test.shape == (3, 1, 8, 8)


def test_image_folder_skips_a_corrupt_file_naming_it(tmp_path):
    write_pngs(tmp_path / "tt", 4)
    (tmp_path / "tt" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match="skipped broken.png"):
        data = pvae.load_image_folder(tmp_path / "tt", (8, 8))
    assert len(data.x_train) + len(data.x_test) == 4


@pytest.mark.parametrize("setup, words", [
    (lambda d: None, "not a folder"),
    (lambda d: d.mkdir(), "holds no image files"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "holds no image files"),
    (lambda d: (d.mkdir(), (d / "a.png").write_bytes(b"junk"), (d / "b.jpg").write_bytes(b"")),
     "holds 0 readable image"),
])
def test_image_folder_errors_are_clear(tmp_path, setup, words):
    setup(tmp_path / "tt")
    with pytest.raises(ValueError, match=words):
        with pytest.warns(UserWarning) if "readable" in words else contextlib.nullcontext():
            pvae.load_image_folder(tmp_path / "tt", (8, 8))


@pytest.mark.parametrize("device, words", [
    ("bogus", "device: got 'bogus'; expected 'cpu'"),
    pytest.param("cuda", "no usable CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_an_unusable_device_is_named_before_any_work(tiny_config, images, device, words):
    with pytest.raises(ValueError, match=words):
        pvae.train(pvae.PartitionVAE(tiny_config), images(tiny_config), images(tiny_config),
                   device=device, progress=False)


def test_odd_checkpoint_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        pvae.load_checkpoint(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty file \(0 bytes\)"):
        pvae.load_checkpoint(tmp_path / "empty.pt")


@pytest.mark.parametrize("scales", [["a"], [float("nan")], [[1.0]]])
def test_traversal_scales_must_be_finite_numbers(tiny_config, images, scales):
    with pytest.raises(ValueError, match="scales: got"):
        pvae.partition_traversal(pvae.PartitionVAE(tiny_config), images(tiny_config, 1)[0], 0, scales)


def test_correlation_plot_checks_partitions_against_the_latent():
    with pytest.raises(ValueError, match=r"partitions: got \(4, 3\) \(sum 7\) for 10 latent units"):
        pvae.plot_latent_correlation(np.random.default_rng(0).normal(size=(20, 10)), (4, 3))


def test_analysis_helpers_name_bad_input(tiny_config, images, tmp_path):
    """Found by a new-user trial: these used to return a wrong number or fail inside torch."""
    x = images(tiny_config, n=4)
    model = pvae.PartitionVAE(tiny_config)
    with pytest.raises(ValueError, match=r"partition_tc: partitions \(4, 3\) sum to 7, mu has shape \(2, 10\)"):
        pvae.partition_tc(torch.zeros(2, 10), torch.zeros(2, 10), (4, 3))
    with pytest.raises(ValueError, match=r"subres_floor: factor got 3; expected a positive integer that divides"):
        pvae.subres_floor_mse(x, 3)
    with pytest.raises(ValueError, match=r"subres_floor: mode got 'cubic'; expected one of"):
        pvae.subres_floor(x, 2, "cubic")
    for fn in (pvae.reconstruct, pvae.latent_means):
        with pytest.raises(ValueError, match=r"x: got ndarray; expected a torch.Tensor"):
            fn(model, x.numpy())
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PVAE checkpoint") as err:
        pvae.load_checkpoint(bad)
    assert "weights_only=False" not in str(err.value)        # never advise the unsafe load


def test_pca_paths_and_drive_name_bad_input(images, tiny_config):
    """Left cryptic by the last trial: a scikit-learn error, a TypeError deep in pathlib."""
    x = images(tiny_config, n=20)
    for n in (0, 21, 2.5):
        with pytest.raises(ValueError, match=rf"pca_mse: n_components: got {n}; expected an integer from 1 to 20"):
            pvae.pca_mse(x, x[:5], n)
    with pytest.raises(ValueError, match=r"pca_mse: x_test has items of shape \(1, 8, 8\)"):
        pvae.pca_mse(x, torch.zeros(3, 1, 8, 8), 2)
    with pytest.raises(ValueError, match=r"pca_mse: x_train: got ndarray"):
        pvae.pca_mse(x.numpy(), x, 2)
    assert pvae.pca_mse(x, x, 20) < 1e-10                    # all components: exact
    with pytest.raises(ValueError, match=r"load_mnist: root: got int 123; expected a folder path"):
        pvae.load_mnist(root=123)
    with pytest.raises(ValueError, match=r"load_pong: root: got NoneType"):
        pvae.load_pong(root=None)
    with pytest.raises(ValueError, match=r"checkpoint_dir: drive=True \(SAVE_TO_DRIVE\) needs Google Colab"):
        pvae.checkpoint_dir(drive=True)
    assert pvae.checkpoint_dir() == pvae.REPO_ROOT / "data" / "checkpoints"


def test_speed_helpers_and_checkpoint_calls_name_bad_input_before_any_change(tiny_config, images, tmp_path):
    """Found by a clean-clone trial of the CPU fast path: raw torch errors, truthy strings taken
    as switches, and a load with a bad device that changed the model before failing."""
    import hashlib

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    model = pvae.PartitionVAE(tiny_config)
    for device in ("gpu", "meta", 3):
        with pytest.raises(ValueError, match=r"place: device: got .*; expected 'cpu'"):
            pvae.place(model, device)
    with pytest.raises(ValueError, match=r"place: model: got str; expected a PartitionVAE"):
        pvae.place("not a model", "cpu")
    with pytest.raises(ValueError, match=r"place: channels_last: got 'no'; expected True, False or None"):
        pvae.place(model, "cpu", channels_last="no")
    with pytest.raises(ValueError, match=r"make_optimizer: fused: got 'no'"):
        pvae.make_optimizer(model, fused="no")
    with pytest.raises(ValueError, match=r"make_optimizer: model: got Linear"):
        pvae.make_optimizer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"checkpoint_dir: drive: got 'no'"):
        pvae.checkpoint_dir(drive="no")
    for name in (123, "", "a.pt", "../x", ".hidden"):
        with pytest.raises(ValueError, match=r"checkpoint_path: name: got"):
            pvae.checkpoint_path(name)

    x = images(tiny_config, n=16)
    path = tmp_path / "run.pt"
    pvae.train(pvae.PartitionVAE(tiny_config.replace(epochs=2)), x, x[:8], progress=False, checkpoint_path=path)
    before = digest(path)
    other = pvae.PartitionVAE(tiny_config)
    weights = [p.detach().clone() for p in other.parameters()]
    for device in ("gpu", "meta"):
        with pytest.raises(ValueError, match=r"load_checkpoint: device: got"):
            pvae.load_checkpoint(path, device=device, model=other)
    assert all(torch.equal(a, b) for a, b in zip(weights, other.parameters()))   # untouched
    with pytest.raises(ValueError, match=r"load_checkpoint: path: got 123; expected a file path"):
        pvae.load_checkpoint(123)
    resumed = pvae.PartitionVAE(tiny_config.replace(epochs=1))
    with pytest.raises(ValueError, match=r"train: epochs got 1, but .* already holds 2 epochs"):
        pvae.train(resumed, x, x[:8], progress=False, checkpoint_path=path, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(weights, other.parameters()))
    with pytest.raises(ValueError, match=r"train: resume: got 'yes'"):
        pvae.train(resumed, x, x[:8], progress=False, checkpoint_path=path, resume="yes")
    for bad in (123, tmp_path):
        with pytest.raises(ValueError, match=r"train: checkpoint_path"):
            pvae.train(resumed, x, x[:8], progress=False, checkpoint_path=bad)
    assert digest(path) == before

    with pytest.raises(ValueError, match=r"pca_mse: x_train: got shape \(16, 1, 16, 16\), dtype torch.uint8"):
        pvae.pca_mse((x * 255).to(torch.uint8), x, 2)
    with pytest.raises(ValueError, match=r"pca_mse: x_test holds non-finite values"):
        pvae.pca_mse(x, torch.full_like(x[:2], float("nan")), 2)
    with pytest.raises(ValueError, match=r"pca_mse: x_train: got 1 image; expected at least 2"):
        pvae.pca_mse(x[:1], x, 1)
    assert pvae.pca_mse(x.requires_grad_(), x.bfloat16(), 3) > 0          # grad and bf16 are fine
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=r"load_mnist: root: .*afile is a file; expected a folder path"):
        pvae.load_mnist(root=afile)
    with pytest.raises(ValueError, match=r"load_mnist: root: got an empty path ''"):
        pvae.load_mnist(root="")


def test_training_over_an_existing_checkpoint_says_it_will_replace_it(tiny_config, images, tmp_path, capsys):
    x = images(tiny_config, n=16)
    path = tmp_path / "run.pt"
    pvae.train(pvae.PartitionVAE(tiny_config.replace(epochs=1)), x, x[:8], progress=False, checkpoint_path=path)
    assert "will be replaced" not in capsys.readouterr().out
    pvae.train(pvae.PartitionVAE(tiny_config.replace(epochs=1)), x, x[:8], progress=False, checkpoint_path=path)
    assert f"the checkpoint at {path} will be replaced when epoch 1 ends" in capsys.readouterr().out
