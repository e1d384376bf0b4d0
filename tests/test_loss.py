"""pvae_loss against torch.distributions, and its per-image normalisation (defect 3)."""
import torch
from torch.distributions import Normal, kl_divergence

import pvae_utils as pvae


def random_terms(config, batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, *config.image_size)
    x, x_hat = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    mu = 2 * torch.randn(batch, config.latent_dim, generator=g)
    logvar = 3 * torch.randn(batch, config.latent_dim, generator=g)
    return x, x_hat, mu, logvar


def test_kl_equals_torch_distributions_against_standard_normal(tiny_config):
    x, x_hat, mu, logvar = random_terms(tiny_config)
    terms = pvae.pvae_loss(x, x_hat, mu, logvar, tiny_config)
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))   # (B, L)
    torch.testing.assert_close(terms["kl"], ref.sum(1).mean())
    for s, value in zip(pvae.partition_slices(tiny_config.partitions), terms["kl_per_partition"]):
        torch.testing.assert_close(value, ref[:, s].sum(1).mean())


def test_defect3_terms_are_per_image_and_independent_of_batch_size(tiny_config):
    """The original summed KL over the batch but averaged the reconstruction, so the balance of
    the two moved with the batch size; and it lacked KL's factor 1/2."""
    x, x_hat, mu, logvar = random_terms(tiny_config, batch=4)
    one = pvae.pvae_loss(x, x_hat, mu, logvar, tiny_config)
    twice = pvae.pvae_loss(*(t.repeat(2, *[1] * (t.ndim - 1)) for t in (x, x_hat, mu, logvar)),
                           tiny_config)
    for k in ("loss", "recon", "kl"):
        torch.testing.assert_close(one[k], twice[k])
    # one unit with mu = 1, logvar = 0 has KL exactly 1/2
    z = torch.zeros(1, tiny_config.latent_dim)
    z[0, 0] = 1.0
    unit = pvae.pvae_loss(x[:1], x[:1], z, torch.zeros_like(z), tiny_config)
    torch.testing.assert_close(unit["kl"], torch.tensor(0.5))
    torch.testing.assert_close(unit["recon"], torch.tensor(0.0))


def test_recon_is_summed_squared_error_per_image_and_loss_weights_apply(tiny_config):
    x, x_hat, mu, logvar = random_terms(tiny_config)
    cfg = tiny_config.replace(recon_weight=2.0, kl_weight=0.3)
    terms = pvae.pvae_loss(x, x_hat, mu, logvar, cfg)
    torch.testing.assert_close(terms["recon"], ((x_hat - x) ** 2).sum() / len(x))
    torch.testing.assert_close(terms["mse"], ((x_hat - x) ** 2).mean())
    torch.testing.assert_close(terms["loss"], 2.0 * terms["recon"] + 0.3 * terms["kl"])
