"""PartitionVAE: shapes, gradients, and regression tests for the original code's defects."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import pvae_utils as pvae

CONFIGS = [
    dict(),  # the MNIST default: 28x28, 4+3+3, f=2, bilinear
    dict(image_size=(28, 28), subres_factor=4, upsample_mode="nearest", partitions=(1,)),
    dict(upsample_mode="nearest-exact", batch_size=64, lr=2.5e-4),  # the report's setting
    dict(image_size=(32, 48), in_channels=3, encoder=((5, 8), (3, 8), (3, 8)), subres_factor=8,
         partitions=(5, 5, 4, 3, 2, 1), decoder_convs=()),
    dict(image_size=(12, 20), encoder=(), subres_factor=1, head_hidden=(), decoder_linear=()),
]


@pytest.mark.parametrize("changes", CONFIGS)
def test_shapes_and_finite_loss_for_several_configs(changes, images):
    cfg = pvae.preset("mnist", **changes)
    model = pvae.PartitionVAE(cfg)
    x = images(cfg, n=3)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape
    assert mu.shape == logvar.shape == (3, cfg.latent_dim)
    assert 0 <= x_hat.min() and x_hat.max() <= 1
    assert [s.stop - s.start for s in model.partition_slices] == list(cfg.partitions)
    small = model.decoder_conv(model.decoder_linear(mu))
    assert small.shape == (3, cfg.in_channels, *cfg.subres_size)  # the decoder works at 1/f
    terms = pvae.pvae_loss(x, x_hat, mu, logvar, cfg)
    assert all(torch.isfinite(v).all() for v in terms.values())


def test_upsampling_is_interpolation_of_the_small_image(tiny_config, images):
    for mode in ("nearest-exact", "bilinear"):
        cfg = tiny_config.replace(upsample_mode=mode)
        model = pvae.PartitionVAE(cfg)
        z = torch.randn(2, cfg.latent_dim)
        small = model.decoder_conv(model.decoder_linear(z))
        expected = torch.nn.functional.interpolate(small, size=cfg.image_size, mode=mode)
        torch.testing.assert_close(model.decode(z), expected)
    # nearest-exact with f=2 copies each small pixel into a 2x2 block
    block = pvae.PartitionVAE(tiny_config.replace(upsample_mode="nearest-exact")).decode(z)
    torch.testing.assert_close(block[..., ::2, ::2], block[..., 1::2, 1::2])


def test_gradients_reach_every_parameter_including_every_partition_head(tiny_config, images):
    model = pvae.PartitionVAE(tiny_config)
    x = images(tiny_config, n=8)
    terms = pvae.pvae_loss(x, *model(x), tiny_config)
    terms["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_defect1_heads_are_registered_trained_and_saved(tiny_config, images):
    """The original kept heads in a plain list: invisible to the optimiser and to state_dict."""
    model = pvae.PartitionVAE(tiny_config)
    n = len(tiny_config.partitions)
    params = {id(p) for p in model.parameters()}
    for heads in (model.mu_heads, model.logvar_heads):
        assert isinstance(heads, torch.nn.ModuleList) and len(heads) == n
        assert all(id(p) in params for h in heads for p in h.parameters())
    keys = model.state_dict().keys()
    for i in range(n):
        assert any(k.startswith(f"mu_heads.{i}.") for k in keys)
        assert any(k.startswith(f"logvar_heads.{i}.") for k in keys)
    before = [p.detach().clone() for h in (*model.mu_heads, *model.logvar_heads) for p in h.parameters()]
    pvae.train(model, images(tiny_config, 16), images(tiny_config, 4, seed=1), epochs=1,
               device="cpu", progress=False)
    after = [p for h in (*model.mu_heads, *model.logvar_heads) for p in h.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_defect2_mean_and_logvar_heads_are_separate_layers(tiny_config, images):
    """The original built both heads from the same layer objects, so logvar equalled mu."""
    model = pvae.PartitionVAE(tiny_config)
    mu_ptrs = {p.data_ptr() for p in model.mu_heads.parameters()}
    lv_ptrs = {p.data_ptr() for p in model.logvar_heads.parameters()}
    assert not mu_ptrs & lv_ptrs
    for m, v in zip(model.mu_heads, model.logvar_heads):
        assert m is not v and all(a is not b for a, b in zip(m.modules(), v.modules()))
    mu, logvar = model.encode(images(tiny_config))
    assert not torch.allclose(mu, logvar)


def test_defect4_model_code_reads_no_module_globals(tiny_config, images):
    """The original read h, w, f and device from notebook globals. Here two models with different
    sizes and factors live side by side, and the module assigns no such names."""
    a = pvae.PartitionVAE(tiny_config)
    b = pvae.PartitionVAE(tiny_config.replace(image_size=(24, 40), subres_factor=4))
    assert a(images(a.config))[0].shape == (6, 1, 16, 16)
    assert b(images(b.config))[0].shape == (6, 1, 24, 40)
    tree = ast.parse(Path(pvae.__file__).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)]
    top_level = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name)}
    assert not top_level & {"h", "w", "f", "device", "latent", "model"}


def test_sampling_in_training_mean_in_evaluation(tiny_config, images):
    model = pvae.PartitionVAE(tiny_config)
    x = images(tiny_config)
    model.eval()
    x_hat, mu, _ = model(x)
    torch.testing.assert_close(x_hat, model.decode(mu))
    model.train()
    assert not torch.allclose(model(x)[0], x_hat)


def test_logvar_stays_in_its_documented_range(tiny_config):
    model = pvae.PartitionVAE(tiny_config.replace(logvar_limit=5.0))
    with torch.no_grad():
        for p in model.logvar_heads.parameters():
            p.fill_(50.0)
    _, logvar = model.encode(torch.ones(2, 1, 16, 16))
    assert logvar.abs().max() <= 5.0


@pytest.mark.parametrize("bad, words", [
    (torch.rand(2, 3, 16, 16), r"shape \(2, 3, 16, 16\); expected \(N, 1, 16, 16\)"),
    (torch.rand(2, 1, 28, 28), r"shape \(2, 1, 28, 28\)"),
    (torch.rand(1, 16, 16), r"shape \(1, 16, 16\)"),
    ((torch.rand(2, 1, 16, 16) * 255).to(torch.uint8), "dtype torch.uint8; .*divide by 255"),
    (torch.rand(2, 1, 16, 16).double(), "dtype torch.float64; expected torch.float32"),
])
def test_wrong_input_raises_value_error_before_any_work(tiny_config, bad, words):
    with pytest.raises(ValueError, match=words):
        pvae.PartitionVAE(tiny_config)(bad)


@pytest.mark.parametrize("z, words", [
    (torch.zeros(2, 5), r"shape \(2, 5\)"),
    (torch.zeros(2, 6, dtype=torch.int64), "dtype torch.int64"),
    (np.zeros((2, 6), dtype=np.float32), "ndarray"),
])
def test_decode_checks_its_latent(tiny_config, z, words):
    with pytest.raises(ValueError, match=f"z: got .*{words}"):
        pvae.PartitionVAE(tiny_config).decode(z)


def test_decode_takes_float64_latents(tiny_config):
    model = pvae.PartitionVAE(tiny_config)
    z = torch.randn(2, 6)
    torch.testing.assert_close(model.decode(z.double()), model.decode(z))


def test_loss_checks_shapes(tiny_config, images):
    x = images(tiny_config, n=2)
    mu = torch.zeros(2, tiny_config.latent_dim)
    with pytest.raises(ValueError, match="x_hat: got shape"):
        pvae.pvae_loss(x, x[:, :, :8], mu, mu, tiny_config)
    with pytest.raises(ValueError, match="mu, logvar: got shapes"):
        pvae.pvae_loss(x, x, mu[:, :4], mu[:, :4], tiny_config)


@pytest.mark.parametrize("call, words", [
    (lambda m, x: pvae.partition_traversal(m, x[None], 0, [1.0]), "expected one image"),
    (lambda m, x: pvae.partition_traversal(m, x, 3, [1.0]), "partition: got 3"),
    (lambda m, x: pvae.partition_traversal(m, x, 0, []), "scales: got"),
    (lambda m, x: pvae.decode_scaled(m, x, 2.0), "partition_scales: got 2.0"),
    (lambda m, x: pvae.decode_scaled(m, x, [1, 1]), "one per partition"),
    (lambda m, x: pvae.trace_shapes(m, x), "shape"),
])
def test_analysis_functions_check_their_arguments(tiny_config, images, call, words):
    with pytest.raises(ValueError, match=words):
        call(pvae.PartitionVAE(tiny_config), images(tiny_config, n=1)[0])


def test_traversal_scales_only_one_partition(tiny_config, images):
    model = pvae.PartitionVAE(tiny_config).eval()
    x = images(tiny_config, n=1)[0]
    grid = pvae.partition_traversal(model, x, 1, [0.0, 1.0, 2.0])
    assert grid.shape == (3, 1, 16, 16)
    torch.testing.assert_close(grid[1], pvae.reconstruct(model, x[None])[0])  # x1 = reconstruction
    mu = model.encode(x[None])[0]
    mu[:, model.partition_slices[1]] *= 2.0
    torch.testing.assert_close(grid[2], model.decode(mu)[0])


def test_parameter_counts_add_up(tiny_config):
    model = pvae.PartitionVAE(tiny_config)
    counts = pvae.parameter_counts(model)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["partition 0 mean head"] == (2 * 8 + 8) + (8 * 2 + 2)


def test_trace_shapes_walks_the_whole_model(tiny_config, images):
    shapes = dict(pvae.trace_shapes(pvae.PartitionVAE(tiny_config), images(tiny_config, n=2)))
    assert shapes["mu (concatenated)"] == (2, 6)
    assert shapes["decoder convs + 1x1 conv + sigmoid"] == (2, 1, 8, 8)
    assert shapes["upsampled (bilinear) x_hat"] == (2, 1, 16, 16)
