"""The embedded MNIST testbed data: shapes, range and a split that never moves."""
import hashlib

import numpy as np
import pytest

from treeq.testbed.data import _load_raw, mnist, split_indices


def test_split_is_stable_disjoint_and_balanced():
    _, labels = _load_raw()
    train, held_out = split_indices(labels)
    assert len(np.intersect1d(train, held_out)) == 0
    assert len(train) + len(held_out) == len(labels) == 5000
    assert np.bincount(labels[held_out]).tolist() == [100] * 10
    again, _ = split_indices(labels)
    assert np.array_equal(train, again)
    # a fixed fingerprint: changing the split silently would invalidate every recorded figure
    assert hashlib.sha256(held_out.tobytes()).hexdigest()[:12] == FINGERPRINT


def test_images_are_padded_and_scaled():
    x, y = mnist("held_out")
    assert x.shape == (1000, 1, 32, 32) and y.shape == (1000,)
    assert x.min() == -1 and x.max() <= 1
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # the 2-pixel border


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="unknown split"):
        mnist("test")


FINGERPRINT = "20562a44f907"  # sha256 of the held-out indices (int64) at the first release
