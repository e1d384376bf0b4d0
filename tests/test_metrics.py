"""Partition-level interpretability metrics: golden values that would have caught bugs public
libraries shipped (MIG and DCI near 1 for a permutation of the factors, near 0 for noise,
invariant to scaling a unit, to the order of samples, and partition level = unit level when
every partition has size 1); the plain-VAE baseline and the between-partition TC penalty."""
import numpy as np
import pytest
import torch

import pvae_utils as pvae

N = 3000


@pytest.fixture(scope="module")
def factors():
    """(N, 4) independent continuous factors, the third undefined (NaN) on 20% of samples."""
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 160, size=(N, 4))
    y[rng.random(N) < 0.2, 2] = np.nan
    return y


def as_latents(y):
    """Latents that are the factors in another order (NaN filled: a latent is always defined)."""
    return np.nan_to_num(y[:, [2, 0, 3, 1]], nan=80.0)


def test_mutual_information_matches_scikit_learn():
    from sklearn.metrics import mutual_info_score
    rng = np.random.default_rng(9)
    a = rng.integers(0, 7, 1000)
    b = (a + rng.integers(0, 3, 1000)) % 9
    assert pvae.mutual_information(a, b) == pytest.approx(mutual_info_score(a, b), abs=1e-12)
    assert pvae.mutual_information(a, a) == pytest.approx(mutual_info_score(a, a), abs=1e-12)
    assert pvae.mutual_information(a, np.zeros(1000, int)) == 0


def test_mig_is_one_for_a_permutation_and_zero_for_noise(factors):
    assert pvae.mig(as_latents(factors), factors)["mig"] > 0.9
    noise = np.random.default_rng(1).normal(size=(N, 4))
    assert pvae.mig(noise, factors)["mig"] < 0.05


def test_mig_is_invariant_to_scaling_a_unit_and_to_sample_order(factors):
    mu = as_latents(factors)
    base = pvae.mig(mu, factors)
    scaled = mu * np.array([1000.0, -0.001, 1.0, 7.0]) + 3.0
    assert pvae.mig(scaled, factors)["mig"] == pytest.approx(base["mig"], abs=1e-12)
    order = np.random.default_rng(2).permutation(N)
    assert pvae.mig(mu[order], factors[order])["mig"] == pytest.approx(base["mig"], abs=1e-12)


def test_partition_level_equals_unit_level_when_every_partition_has_size_1(factors):
    rng = np.random.default_rng(3)
    mu = as_latents(factors) + rng.normal(scale=30, size=(N, 4))
    assert pvae.mig(mu, factors, (1, 1, 1, 1))["mig"] == pytest.approx(pvae.mig(mu, factors)["mig"], abs=1e-12)
    unit = pvae.dci(mu[:2000], factors[:2000], mu[2000:], factors[2000:])
    part = pvae.dci(mu[:2000], factors[:2000], mu[2000:], factors[2000:], (1, 1, 1, 1))
    for key in ("disentanglement", "completeness", "informativeness"):
        assert part[key] == pytest.approx(unit[key], abs=1e-12)


def test_partition_mig_credits_a_factor_spread_inside_one_partition(factors):
    """Two units that each hold half of a factor (its sum): unit-level MIG sees two weak codes,
    partition-level MIG one strong code, when the two units form one partition."""
    rng = np.random.default_rng(4)
    y = factors[:, :2]
    a = rng.uniform(0, 1, N) * y[:, 0]
    mu = np.column_stack([a, y[:, 0] - a, y[:, 1]])
    unit = pvae.mig(mu, y, bins=10)["per_factor"][0]
    part = pvae.mig(mu, y, (2, 1), bins=10)["per_factor"][0]
    assert part > unit + 0.2


def test_dci_is_one_for_a_permutation_and_zero_for_noise(factors):
    mu = as_latents(factors)
    d = pvae.dci(mu[:2000], factors[:2000], mu[2000:], factors[2000:])
    assert d["disentanglement"] > 0.9 and d["completeness"] > 0.9 and d["informativeness"] > 0.95
    noise = np.random.default_rng(5).normal(size=(N, 4))
    d = pvae.dci(noise[:2000], factors[:2000], noise[2000:], factors[2000:])
    assert d["disentanglement"] < 0.15 and d["informativeness"] < 0.05


def test_dci_is_invariant_to_scaling_a_unit_and_nearly_to_sample_order(factors):
    rng = np.random.default_rng(6)
    mu = as_latents(factors) + rng.normal(scale=20, size=(N, 4))
    base = pvae.dci(mu[:2000], factors[:2000], mu[2000:], factors[2000:])
    scaled = mu * np.array([1000.0, 0.001, 1.0, 7.0])
    again = pvae.dci(scaled[:2000], factors[:2000], scaled[2000:], factors[2000:])
    order = rng.permutation(2000)
    shuffled = pvae.dci(mu[:2000][order], factors[:2000][order], mu[2000:], factors[2000:])
    for key in ("disentanglement", "completeness", "informativeness"):
        assert again[key] == pytest.approx(base[key], abs=1e-6)       # trees split on order only
        assert shuffled[key] == pytest.approx(base[key], abs=0.03)     # other random trees


def test_active_units_and_block_score():
    rng = np.random.default_rng(7)
    shared = rng.normal(size=(500, 2))
    mu = np.column_stack([shared[:, 0], shared[:, 0] + 0.1 * rng.normal(size=500),   # partition 0
                          shared[:, 1], shared[:, 1] + 0.1 * rng.normal(size=500),   # partition 1
                          np.full(500, 0.3) + 0.001 * rng.normal(size=500)])         # dead
    assert pvae.active_units(mu, (2, 2, 1)) == [2, 2, 0]
    block = pvae.block_score(mu, (2, 2, 1))
    assert block["within"] > 0.95 and block["between"] < 0.1 and block["ratio"] > 10
    crossed = pvae.block_score(mu[:, [0, 2, 1, 3, 4]], (2, 2, 1))
    assert crossed["ratio"] < 1


def test_plain_vae_has_no_partition_heads_and_trains(tiny_config, images):
    config = tiny_config.replace(partition_heads=False)
    model = pvae.PartitionVAE(config)
    assert len(model.mu_heads) == 0 and len(model.logvar_heads) == 0
    x = images(config, n=16)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (16, config.latent_dim)
    assert not torch.equal(mu, logvar)
    history = pvae.train(model, x, x[:8], progress=False)
    assert np.isfinite(history["test_loss"]).all()
    with pytest.raises(ValueError, match="partition_heads: got 'no'"):
        tiny_config.replace(partition_heads="no")


def test_partition_tc_is_near_zero_for_independent_partitions_and_near_the_truth_for_shared_ones():
    """Codes mu ~ N(0, 4 I) with unit posterior variance. Independent partitions: true TC 0.
    Partition 1 a copy of partition 0's mean: z_0, z_1 share s ~ N(0, 4), each unit with unit
    noise, so TC = I(z_0; z_1) = 1/2 log(4.5^2 / (4.5^2 - 16)) = 0.78 nats (2 units each)."""
    torch.manual_seed(0)
    b = 512
    logvar = torch.zeros(b, 4)
    independent = 2 * torch.randn(b, 4)
    shared = 2 * torch.randn(b, 1).repeat(1, 4)
    truth = 0.5 * np.log(4.5 ** 2 / (4.5 ** 2 - 16))
    assert abs(pvae.partition_tc(independent, logvar, (2, 2)).item()) < 0.15
    assert pvae.partition_tc(shared, logvar, (2, 2)).item() == pytest.approx(truth, abs=0.15)
    assert pvae.partition_tc(shared, logvar, (4,)).abs() < 1e-4          # one partition: no TC


def test_tc_penalty_enters_the_loss_and_its_gradient(tiny_config, images):
    config = tiny_config.replace(tc_weight=0.5)
    model = pvae.PartitionVAE(config)
    x = images(config, n=16)
    x_hat, mu, logvar = model(x)
    torch.manual_seed(1)
    terms = pvae.pvae_loss(x, x_hat, mu, logvar, config)
    assert "tc" in terms and "tc" not in pvae.pvae_loss(x, x_hat, mu, logvar, tiny_config)
    base = config.recon_weight * terms["recon"] + config.kl_weight * terms["kl"]
    assert terms["loss"].item() == pytest.approx((base + 0.5 * terms["tc"]).item(), rel=1e-6)
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.mu_heads.parameters())
    with pytest.raises(ValueError, match="tc_weight: got -1"):
        tiny_config.replace(tc_weight=-1)


def test_interpretability_metrics_and_the_table_on_a_tiny_run(tiny_config, images):
    """The comparison's plumbing on random frames with made-up factors: every metric present
    and finite, the table names every model, bad factor names are refused."""
    config = tiny_config
    x = images(config, n=60)
    rng = np.random.default_rng(8)
    y = torch.tensor(rng.uniform(0, 1, size=(60, 2)), dtype=torch.float32)
    data = pvae.ImageData(x[:40], y[:40], x[40:], y[40:], "random test frames", ("a", "b"))
    model = pvae.PartitionVAE(config)
    m = pvae.interpretability_metrics(model, data, factors=("a", "b"), bins=5)
    assert len(m["active_units"]) == len(config.partitions)
    assert np.array(m["factor_map"]).shape == (len(config.partitions) + 1, 2)
    for key, _, _ in pvae.COMPARE_COLUMNS:
        assert np.isfinite(m[key]), key
    results = {"PVAE": {"seeds": [0, 1], "runs": [m, m]}, "plain VAE": {"seeds": [0, 1], "runs": [m, m]}}
    table = pvae.format_comparison(results)
    assert "PVAE" in table and "plain VAE" in table and "± 0.00" in table
    with pytest.raises(ValueError, match=r"factors: \['ball_x'\] are not among"):
        pvae.interpretability_metrics(model, data, factors=("ball_x",))


def test_traversal_gif_has_one_frame_per_scale(tiny_config, images, tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(pvae, "figures_dir", lambda: tmp_path)
    model = pvae.PartitionVAE(tiny_config)
    path = pvae.save_traversal_gif(model, images(tiny_config, n=1)[0], 1, "t", scales=[-2, 0, 2], zoom=2)
    gif = Image.open(path)
    assert gif.n_frames == 3 and gif.size == (32, 32)


def test_the_comparison_refuses_bad_arguments_before_training(tiny_config, images, tmp_path, monkeypatch):
    """Every argument of compare_models and interpretability_metrics is checked before the first
    model trains: nothing is written to the checkpoint folder."""
    x = images(tiny_config, n=20)
    y = torch.zeros(20, len(pvae.PONG_FACTORS))
    frames = pvae.ImageData(x[:16], y[:16], x[16:], y[16:], "frames", pvae.PONG_FACTORS)
    unlabelled = pvae.ImageData(x[:16], torch.full((16,), -1), x[16:], torch.full((4,), -1), "images")
    monkeypatch.setitem(pvae.PRESETS, "tiny", tiny_config)
    for kwargs, match in (({"seeds": 3}, r"seeds: got 3; expected a non-empty list of integers"),
                          ({"seeds": ()}, r"seeds: got \(\); expected"),
                          ({"models": ["PVAE"]}, r"models: got \['PVAE'\]; expected a non-empty dict"),
                          ({"models": {"PVAE": "compare_pvae"}}, r"PVAE: preset 'compare_pvae' expects images \(32, 32\)")):
        with pytest.raises(ValueError, match=match):
            pvae.compare_models(frames, **{"models": {"tiny": "tiny"}, **kwargs}, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"data: its factors \(\) lack \['ball_x'"):
        pvae.compare_models(unlabelled, models={"tiny": "tiny"}, checkpoint_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    model = pvae.PartitionVAE(tiny_config)
    with pytest.raises(ValueError, match=r"factors: got 'ball_x'; expected a non-empty tuple"):
        pvae.interpretability_metrics(model, frames, factors="ball_x")
    with pytest.raises(ValueError, match=r"bins: got 0; expected an integer >= 2"):
        pvae.interpretability_metrics(model, frames, bins=0)
