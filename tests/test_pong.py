"""Atari Pong frames: RAM factors match the screen, and preprocessing keeps the ball."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pvae_utils as pvae

BALL, GREEN, ORANGE = (236, 236, 236), (92, 186, 92), (213, 130, 74)


@pytest.fixture(scope="module")
def played():
    """300 frames of real play: screens (N, 210, 160, 3) and RAM (N, 128)."""
    return pvae._play_pong(300, seed=1, frame_skip=4)


def field_box(screen, color, columns):
    """(top, bottom, left, right) of the pixels of ``color`` in the play field's ``columns``,
    in play-field coordinates, or None."""
    top, bottom = pvae.PONG_FIELD_ROWS
    mask = (screen[top:bottom] == np.array(color)).all(-1)
    mask[:, :columns[0]] = False
    mask[:, columns[1]:] = False
    ys, xs = np.nonzero(mask)
    return None if len(ys) == 0 else (ys.min(), ys.max(), xs.min(), xs.max())


def test_ram_factors_match_the_objects_on_screen(played):
    screens, rams = played
    factors = pvae.pong_factors(rams)
    checked = {"ball": 0, "player": 0, "opponent": 0}
    for screen, f in zip(screens, factors):
        ball = field_box(screen, BALL, (0, 160))
        if ball is not None and np.isfinite(f[0]) and ball[1] - ball[0] == 3:  # whole ball seen
            assert abs((ball[2] + ball[3]) / 2 - f[0]) <= 0.5
            assert abs((ball[0] + ball[1]) / 2 - f[1]) <= 1.5    # the RAM may lag one frame
            checked["ball"] += 1
        for name, color, cols, col in (("player", GREEN, (140, 144), 2), ("opponent", ORANGE, (16, 20), 3)):
            box = field_box(screen, color, cols)
            if box is not None and box[1] - box[0] == 15:          # whole paddle, not at a wall
                assert abs((box[0] + box[1]) / 2 - f[col]) <= 1.5
                checked[name] += 1
    assert min(checked.values()) >= 30, checked                  # a real sample of each object
    out = ~np.isfinite(factors[:, 0])
    assert 0 < out.mean() < 0.8                                   # serves and misses happen
    assert set(np.unique(factors[:, 4])) | set(np.unique(factors[:, 5])) <= set(range(22))


def test_preprocessing_keeps_the_ball_where_a_plain_resize_loses_it(played):
    screens, rams = played
    factors = pvae.pong_factors(rams)
    in_play = np.isfinite(factors[:, 0])
    small = pvae.pong_preprocess(screens[in_play], 64)                        # (n, 1, 64, 64)
    assert small.shape[1:] == (1, 64, 64)
    ball_grey = pvae.PONG_LEVELS["ball"]
    resized = F.interpolate(pvae.pong_preprocess(screens[in_play], 160), size=64, mode="bilinear",
                            antialias=True)
    kept = lost_by_resize = 0
    for img, plain, (x, y) in zip(small[:, 0], resized[:, 0], factors[in_play, :2]):
        r, c = int(y * 64 / 160), int(x * 64 / 160)
        window = (slice(max(r - 1, 0), r + 2), slice(max(c - 1, 0), c + 2))
        kept += bool(img[window].max() >= ball_grey - 0.01)
        lost_by_resize += bool(plain[window].max() < 0.8 * ball_grey)
    n = int(in_play.sum())
    assert n >= 50 and kept == n                 # every ball in play survives max-pooling
    assert lost_by_resize > n / 2                # a plain resize dims most of them


def test_load_pong_caches_and_splits(tmp_path):
    data = pvae.load_pong(60, seed=2, root=tmp_path, size=32)
    assert data.x_train.shape == (54, 1, 32, 32) and data.x_test.shape == (6, 1, 32, 32)
    assert data.y_train.shape == (54, 6) and data.label_names == pvae.PONG_FACTORS
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1
    again = pvae.load_pong(60, seed=2, root=tmp_path, size=32)
    assert torch.equal(again.x_test, data.x_test)
    assert (tmp_path / f"pong{pvae.PONG_CACHE_VERSION}-60-2-4-32.pt").is_file()
    with pytest.raises(ValueError, match="load_pong: n_frames got 1"):
        pvae.load_pong(1)


# ------------------------------------------------------------------ read-back and factor map

@pytest.fixture(scope="module")
def fields(played):
    """The played frames as 64x64 model inputs (N, 1, 64, 64) with their factors (N, 6)."""
    screens, rams = played
    return pvae.pong_preprocess(screens, 64), torch.from_numpy(pvae.pong_factors(rams)).float()


def test_readback_finds_the_objects_on_real_inputs(fields):
    x, factors = fields
    acc = pvae.pong_readback_accuracy(x, factors)
    assert acc["player_y"]["frames"] >= 100 and acc["opponent_y"]["frames"] >= 100
    assert acc["player_y"]["within"] >= 0.99 and acc["opponent_y"]["within"] >= 0.99
    assert acc["player_y"]["median_error"] <= 1.5
    assert acc["ball"]["frames"] >= 50 and acc["ball"]["within"] >= 0.9


def test_readback_follows_a_moved_paddle_and_misses_an_empty_field(fields):
    x, factors = fields
    i = int(torch.nonzero((factors[:, 2] > 40) & (factors[:, 2] < 120))[0, 0])
    shifted = torch.roll(x[i:i + 1], shifts=8, dims=2)                  # 8 rows = 20 field pixels
    before = pvae.pong_paddle_readback(x[i:i + 1])["player_y"]
    after = pvae.pong_paddle_readback(shifted)["player_y"]
    assert after - before == pytest.approx(20.0, abs=0.01)
    empty = torch.full_like(x[:3], pvae.PONG_LEVELS["background"])
    assert torch.isnan(pvae.pong_paddle_readback(empty)["player_y"]).all()
    assert torch.isnan(pvae.pong_ball_readback(empty)).all()
    acc = pvae.pong_readback_accuracy(empty, factors[:3])
    assert all(acc[k]["within"] == 0 for k in ("player_y", "opponent_y") if acc[k]["frames"])


def test_subres_floor_keeps_the_paddles_readable(fields):
    x, factors = fields
    floor = pvae.subres_floor(x, 2, "nearest-exact")
    assert floor.shape == x.shape
    assert pvae.subres_floor_mse(x, 2) == pytest.approx(float((floor - x).pow(2).mean()))
    acc = pvae.pong_readback_accuracy(floor, factors)
    assert acc["opponent_y"]["within"] >= 0.95 and acc["player_y"]["within"] >= 0.9


def test_factor_map_finds_the_partition_that_holds_each_factor():
    rng = np.random.default_rng(0)
    factors = rng.uniform(0, 160, size=(600, 3))
    factors[rng.random(600) < 0.3, 2] = np.nan                  # undefined values are left out
    noise = rng.normal(size=(600, 2))
    # partition 0 holds factors 0 and 1 (non-linearly), partition 1 factor 2, partition 2 noise
    mu = np.column_stack([np.exp(factors[:, 0] / 80), factors[:, 1] ** 2,
                          np.nan_to_num(factors[:, 2], nan=0.0), noise])
    r2 = pvae.factor_r2_map(mu[:500], factors[:500], mu[500:], factors[500:], (2, 1, 2))
    assert r2.shape == (4, 3)
    assert r2[0, 0] > 0.9 and r2[0, 1] > 0.9 and r2[1, 2] > 0.9 and r2[3].min() > 0.9
    assert r2[2].max() < 0.1 and r2[1, :2].max() < 0.1 and r2[0, 2] < 0.1
    shuffled = rng.permutation(500)                              # order of samples is irrelevant
    again = pvae.factor_r2_map(mu[:500][shuffled], factors[:500][shuffled], mu[500:], factors[500:],
                               (2, 1, 2))
    assert np.allclose(again, r2, atol=0.05)


def test_factor_map_plot_checks_its_shape():
    with pytest.raises(ValueError, match=r"r2: got shape \(2, 2\); expected \(3, 2\)"):
        pvae.plot_factor_map(np.zeros((2, 2)), (1, 1), ("a", "b"))


def test_table_tennis_uses_a_users_folder_or_says_it_falls_back(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "tt"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((40, 30, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    data = pvae.load_table_tennis(folder, size=32)
    assert data.x_train.shape == (4, 1, 32, 32) and "Sports10" in capsys.readouterr().out
    data = pvae.load_table_tennis(tmp_path / "missing", n_frames=40, root=tmp_path, size=32)
    assert data.label_names == pvae.PONG_FACTORS
    assert "no Sports10 folder" in capsys.readouterr().out and "Atari Pong" in data.source
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        pvae.load_table_tennis(tmp_path / "empty")


def test_pong_preset_trains_a_step_on_real_frames(fields):
    x, _ = fields
    config = pvae.preset("pong", epochs=1, batch_size=16)
    assert config.partitions == (5, 5, 4, 3, 2, 1) and config.subres_factor == 2
    model = pvae.PartitionVAE(config)
    history = pvae.train(model, x[:32], x[32:48], progress=False)
    assert np.isfinite(history["test_mse"][0]) and model(x[:2])[0].shape == (2, 1, 64, 64)


@pytest.fixture(scope="module")
def small_pong(tmp_path_factory):
    """5,000 real frames at 32x32, as in the comparison, cached in a temporary folder (~3 s)."""
    return pvae.load_pong(5000, seed=0, root=tmp_path_factory.mktemp("pong"), size=32)


def test_sparse_frames_train_only_with_the_output_bias_started_near_the_mean(small_pong):
    """Regression: Pong frames are 99% black. With the output sigmoid started at 0.5 the first
    steps push it so far below 0 that its gradient vanishes: the model draws an empty field and
    the KL goes to 0 (seen with the first table-tennis preset). Started near the mean pixel
    (output_bias_init=-5, the presets' setting) the same run uses its latent."""
    data = small_pong
    results = {}
    for bias in (None, -5.0):
        pvae.set_seed(0)
        model = pvae.PartitionVAE(pvae.preset("compare_pvae", output_bias_init=bias, epochs=2))
        history = pvae.train(model, data.x_train, data.x_test, progress=False)
        results[bias] = history["test_kl"][-1], history["test_recon"][-1]
    empty_field = float(data.x_test.pow(2).sum(dim=(1, 2, 3)).mean())   # recon of drawing nothing
    kl, recon = results[None]
    assert kl < 0.5 and recon > 0.9 * empty_field, results
    kl, recon = results[-5.0]
    assert kl > 3 and recon < 0.9 * empty_field, (results, empty_field)


def test_pong_functions_name_bad_input(played, fields, tmp_path):
    screens, _ = played
    x, factors = fields
    for bad, got in ((screens[0], r"uint8 array of shape \(210, 160, 3\)"),
                     (screens[:2].astype(np.float32), r"float32 array of shape \(2, 210, 160, 3\)"),
                     (torch.from_numpy(screens[:2]), "Tensor")):
        with pytest.raises(ValueError, match=f"pong_preprocess: screens got {got}; expected a uint8"):
            pvae.pong_preprocess(bad)
    with pytest.raises(ValueError, match=r"pong_preprocess: size got 32.0; expected a positive integer"):
        pvae.pong_preprocess(screens[:2], 32.0)
    for fn in (pvae.pong_paddle_readback, pvae.pong_ball_readback):
        with pytest.raises(ValueError, match=r"x got ndarray; expected a float tensor \(N, 1, S, S\)"):
            fn(x.numpy())
        with pytest.raises(ValueError, match=r"x got torch.float32 tensor of shape \(1, 64, 64\)"):
            fn(x[0])
    with pytest.raises(ValueError, match=r"factors got shape \(3, 4\); expected \(5, 6\)"):
        pvae.pong_readback_accuracy(x[:5], factors[:3, :4])
    for fraction in (0, 1.0, "0.1"):
        with pytest.raises(ValueError, match=f"load_pong: test_fraction got {fraction!r}"):
            pvae.load_pong(20, root=tmp_path, test_fraction=fraction)
    assert list(tmp_path.iterdir()) == []                     # refused before any frame is played
