"""PVAEConfig: presets, JSON round trip, and bad values rejected before any work."""
import json

import pytest

import pvae_utils as pvae


def test_presets_hold_the_report_setting():
    report = pvae.preset("mnist_report")
    assert report.partitions == (4, 3, 3) and report.latent_dim == 10
    assert report.subres_factor == 2 and report.upsample_mode == "nearest-exact"
    assert (report.epochs, report.lr, report.batch_size) == (25, 2.5e-4, 64)
    assert (report.kl_weight, report.recon_weight, report.noise_std) == (0.1, 1.0, 0.01)
    default = pvae.preset("mnist")
    # the default differs only in learning rate, batch size and upsampling (README says why)
    assert default.replace(lr=2.5e-4, batch_size=64, upsample_mode="nearest-exact") == report


def test_json_round_trip_gives_an_equal_config():
    cfg = pvae.preset("mnist", upsample_mode="bilinear", partitions=(5, 5))
    again = pvae.PVAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.encoder == ((3, 32), (3, 64))


def test_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match="unknown field.*'latent'"):
        pvae.PVAEConfig.from_dict({"latent": 10})


def test_replace_and_preset_name_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field.*'subres'"):
        pvae.preset("mnist", subres=2)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset: got 'cifar'"):
        pvae.preset("cifar")


@pytest.mark.parametrize("changes, field, words", [
    ({"partitions": ()}, "partitions", "non-empty"),
    ({"partitions": (4, 0, 3)}, "partitions", "positive integers"),
    ({"partitions": (4, -1)}, "partitions", "positive integers"),
    ({"partitions": (4, 2.5)}, "partitions", "positive integers"),
    ({"image_size": (4, 4)}, "image_size", "at least 8 pixels"),  # 3 pooling layers: 4 -> 0
    ({"image_size": (28, 28), "encoder": ((3, 8),) * 5}, "image_size", "at least 32 pixels"),
    ({"subres_factor": 3}, "subres_factor", "divides image_size"),
    ({"subres_factor": 0}, "subres_factor", "positive integer"),
    ({"upsample_mode": "cubic"}, "upsample_mode", "nearest-exact"),
    ({"encoder": ((4, 8),)}, "encoder", "odd"),
    ({"encoder": ((3, 0),)}, "encoder", "positive"),
    ({"decoder_convs": ((3,),)}, "decoder_convs", "pairs"),
    ({"head_hidden": (0,)}, "head_hidden", "positive"),
    ({"in_channels": 0}, "in_channels", "positive"),
    ({"kl_weight": -0.1}, "kl_weight", ">= 0"),
    ({"recon_weight": 0}, "recon_weight", "> 0"),
    ({"lr": float("nan")}, "lr", "finite"),
    ({"batch_size": 0}, "batch_size", "positive"),
    ({"epochs": True}, "epochs", "non-negative integer"),
])
def test_bad_values_raise_value_error_naming_field_value_and_expectation(changes, field, words):
    base = {"image_size": (8, 8), "encoder": ((3, 4),) * 3} if "image_size" in changes and \
        changes["image_size"] == (4, 4) else {}
    with pytest.raises(ValueError) as err:
        pvae.PVAEConfig(**{**base, **changes})
    text = str(err.value)
    assert f"PVAEConfig.{field}" in text and "got" in text and "expected" in text and words in text
