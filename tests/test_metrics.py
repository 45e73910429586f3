"""Dice and HD95 on hand-built masks, and HD95 against a brute-force reference of medpy's definition."""
import math

import numpy as np
import pytest
import torch

import metrics


def brute_hd95(a, b):
    """medpy.metric.binary.hd95 written the slow, obvious way: surfaces by erosion with a cross,
    all pairwise distances, 95th percentile of both directions pooled."""
    def surface(m):
        p = np.pad(m, 1)
        eroded = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return np.argwhere(m & ~eroded)
    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def square(size, r0, c0, side):
    m = np.zeros((size, size), bool)
    m[r0:r0 + side, c0:c0 + side] = True
    return m


def test_dice_hand_built():
    a = square(10, 0, 0, 4)  # 16 pixels
    b = square(10, 2, 2, 4)  # 16 pixels, overlap 2x2 = 4
    assert metrics.dice(a, b) == pytest.approx(2 * 4 / 32)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, ~a & False) == 0.0


def test_empty_masks():
    empty = np.zeros((20, 30), bool)
    one = square(30, 5, 5, 3)[:20]
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.hd95(empty, empty) == 0.0
    assert metrics.dice(one, empty) == 0.0
    assert math.isnan(metrics.hd95(one, empty))  # undefined (medpy raises): left out of the means, counted
    assert math.isnan(metrics.hd95(empty, one))


def test_hd95_identical_and_shifted():
    a = square(40, 10, 10, 8)
    assert metrics.hd95(a, a) == 0.0
    b = square(40, 10, 15, 8)  # shifted right by 5: every surface distance is between 0 and 5
    h = metrics.hd95(a, b)
    assert 0 < h <= 5
    assert h == pytest.approx(brute_hd95(a, b), abs=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_hd95_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    a = rng.random((48, 37)) < 0.15
    b = rng.random((48, 37)) < 0.1
    assert metrics.hd95(a, b) == pytest.approx(brute_hd95(a, b), abs=1e-4)
    assert metrics.hd95(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(brute_hd95(a, b), abs=1e-4)


def test_hd95_touching_the_image_border():
    a = np.zeros((12, 12), bool)
    a[:, :3] = True  # touches three borders: those pixels count as surface, as in scipy's erosion
    b = np.zeros((12, 12), bool)
    b[:, 6:9] = True
    assert metrics.hd95(a, b) == pytest.approx(brute_hd95(a, b), abs=1e-4)


def test_metrics_are_fast_enough_for_drive_sized_masks():
    import time
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.random((584, 565)) < 0.12)
    b = torch.from_numpy(rng.random((584, 565)) < 0.12)
    t = time.time()
    metrics.hd95(a, b)
    assert time.time() - t < 5  # noisy masks are far worse than vessels; DRIVE's 20 take ~1 s on 2 CPU cores
