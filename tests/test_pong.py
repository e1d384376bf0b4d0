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
    ball_grey = np.dot(BALL, [0.299, 0.587, 0.114]) / 255
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
    assert (tmp_path / "pong-60-2-4-32.pt").is_file()
    with pytest.raises(ValueError, match="load_pong: n_frames got 1"):
        pvae.load_pong(1)
