"""The scikit-learn digits data set (bundled, no download): a seeded split and a content hash."""

from __future__ import annotations

import hashlib
from typing import Final

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

#: Shape of one image as the model takes it (channels, height, width), batch axis excluded.
IMAGE_SHAPE: Final[tuple[int, int, int]] = (1, 8, 8)
#: Largest pixel intensity in the data set (pixels are integers 0..16).
MAX_INTENSITY: Final[float] = 16.0
#: Number of classes (the digits 0..9).
NUM_CLASSES: Final[int] = 10
#: Fraction of the data set held out for testing (stratified by label).
TEST_FRACTION: Final[float] = 0.2

DigitsSplit = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The whole data set in model layout.

    Returns:
        `(images, labels)`: float32 raw intensities 0..16 shaped [1797, 1, 8, 8] and int64
        labels shaped [1797].
    """
    bunch = load_digits()
    images = np.ascontiguousarray(bunch.images, dtype=np.float32).reshape(-1, *IMAGE_SHAPE)
    labels = np.ascontiguousarray(bunch.target, dtype=np.int64)
    return images, labels


def load_digits_split(seed: int = 0) -> DigitsSplit:
    """A reproducible stratified train/test split of the digits data set.

    The same `seed` always gives the same split, so any test can recover the images a
    model trained with that seed never saw.

    Args:
        seed: seed of the shuffle before splitting.

    Returns:
        `(x_train, x_test, y_train, y_test)`: float32 raw intensities (0..16, not normalised)
        shaped [N, 1, 8, 8] and int64 labels shaped [N]; `TEST_FRACTION` of the data is held out.
    """
    images, labels = load_digits_arrays()
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(y_test),
    )


def dataset_sha256() -> str:
    """Hex sha256 of the whole data set (float32 image bytes, then int64 label bytes).

    It identifies the training data in a model card independently of the split and seed.
    """
    images, labels = load_digits_arrays()
    digest = hashlib.sha256()
    digest.update(images.tobytes())
    digest.update(labels.tobytes())
    return digest.hexdigest()
