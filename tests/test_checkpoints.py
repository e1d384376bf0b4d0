"""Checkpoints: round trip from the file alone, atomic writes, and files that are not ours."""
import hashlib

import numpy as np
import pytest
import torch

import pvae_utils as pvae


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_rebuilds_the_model_from_the_file_alone(tiny_config, images, tmp_path):
    cfg = tiny_config.replace(upsample_mode="bilinear", partitions=(3, 2))
    model = pvae.place(pvae.PartitionVAE(cfg), "cpu").eval()  # the layout load_checkpoint gives
    history = {"epoch": [1], "test_mse": [0.5]}
    path = pvae.save_checkpoint(tmp_path / "run.pt", model, history)
    raw = torch.load(path, weights_only=True)  # plain tensors and strings: no code runs
    assert raw["format"] == "pvae-checkpoint" and raw["version"] == 1
    loaded, loaded_history = pvae.load_checkpoint(path)
    assert loaded.config == cfg and loaded_history == history and not loaded.training
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = images(cfg)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_defect5_a_whole_pickled_model_is_refused_with_the_reason(tiny_config, tmp_path):
    """The original saved torch.save(model): unloadable on torch >= 2.6, and it runs code."""
    path = tmp_path / "model.pt"
    torch.save(pvae.PartitionVAE(tiny_config), path)
    before = digest(path)
    with pytest.raises(ValueError, match="execute code"):
        pvae.load_checkpoint(path)
    assert digest(path) == before


@pytest.mark.parametrize("content, words", [
    (b"this is a text file, not a checkpoint", "not a readable PVAE checkpoint"),
    (b"<!DOCTYPE html><html>a saved error page</html>", "not a readable PVAE checkpoint"),
    (b"", "empty file"),
])
def test_a_file_that_is_not_a_checkpoint_gives_a_clear_error(tmp_path, content, words):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=words):
        pvae.load_checkpoint(path)
    assert path.read_bytes() == content


def test_a_truncated_checkpoint_gives_a_clear_error_and_stays_as_it_was(tiny_config, tmp_path):
    path = pvae.save_checkpoint(tmp_path / "run.pt", pvae.PartitionVAE(tiny_config))
    path.write_bytes(path.read_bytes()[:2000])
    before = digest(path)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        pvae.load_checkpoint(path)
    assert digest(path) == before


def test_other_torch_files_and_versions_are_named(tiny_config, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(pvae.PartitionVAE(tiny_config).state_dict(), path)
    with pytest.raises(ValueError, match="not a PVAE checkpoint"):
        pvae.load_checkpoint(path)
    blob = torch.load(pvae.save_checkpoint(tmp_path / "v.pt", pvae.PartitionVAE(tiny_config)),
                      weights_only=True)
    torch.save({**blob, "version": 99}, tmp_path / "v.pt")
    with pytest.raises(ValueError, match="version 99"):
        pvae.load_checkpoint(tmp_path / "v.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        pvae.load_checkpoint(tmp_path / "missing.pt")


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tiny_config, tmp_path, monkeypatch):
    model = pvae.PartitionVAE(tiny_config)
    path = pvae.save_checkpoint(tmp_path / "run.pt", model, {"epoch": [1]})
    before = digest(path)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkp")  # partial bytes, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        pvae.save_checkpoint(path, model, {"epoch": [1, 2]})
    monkeypatch.undo()
    assert digest(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]
    assert pvae.load_checkpoint(path)[1] == {"epoch": [1]}


def test_numpy_numbers_in_a_config_still_save(tiny_config, tmp_path):
    cfg = tiny_config.replace(partitions=np.array([2, 3]), kl_weight=np.float32(0.25))
    assert cfg.partitions == (2, 3) and type(cfg.partitions[0]) is int
    model, _ = pvae.load_checkpoint(pvae.save_checkpoint(tmp_path / "np.pt", pvae.PartitionVAE(cfg)))
    assert model.config == cfg


def test_training_writes_a_checkpoint_every_epoch(tiny_config, images, tmp_path, monkeypatch):
    model = pvae.PartitionVAE(tiny_config)
    saved = []
    real_save = pvae.save_checkpoint
    monkeypatch.setattr(pvae, "save_checkpoint",
                        lambda path, m, h, **kw: saved.append(list(h["epoch"])) or real_save(path, m, h, **kw))
    history = pvae.train(model, images(tiny_config, 16), images(tiny_config, 4, seed=1),
                         device="cpu", progress=False, checkpoint_path=tmp_path / "run.pt")
    assert saved == [[1], [1, 2]]
    loaded, saved_history = pvae.load_checkpoint(tmp_path / "run.pt")
    assert saved_history == history
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
