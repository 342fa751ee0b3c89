"""The reference profile of a trained model version: its training inputs and its confidence on them.

The drift monitor (`monitoring/drift.py`) compares live traffic with this profile, so it is
built from exactly what the model learned from (the training split, in the layout clients
send) and from the *exported* model's outputs on it (what the server will run).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monitoring.drift import (
    CONFIDENCE,
    PROFILE_FILENAME,
    ReferenceProfile,
    build_profile,
    top_class_confidence,
    write_profile,
)

logger = logging.getLogger(__name__)


def reference_profile(
    inputs: Mapping[str, np.ndarray],
    probabilities: np.ndarray | None,
    *,
    source: str = "",
) -> ReferenceProfile:
    """The reference profile of a model's training inputs and its confidence on them.

    Args:
        inputs: input name -> the training split (batch axis first, raw client layout).
        probabilities: the model's class probabilities on those inputs ([N, classes]), or
            None for a model without a probabilities output.
        source: what the data and the model were (kept in the file).

    Returns:
        The profile (`monitoring.drift.build_profile`).

    Raises:
        ValueError: `probabilities` does not have one row per input sample.
    """
    confidence = None
    if probabilities is not None:
        samples = {len(a) for a in inputs.values()}
        if samples and samples != {len(probabilities)}:
            raise ValueError(
                f"{len(probabilities)} probability rows for inputs of {sorted(samples)} samples"
            )
        confidence = top_class_confidence(probabilities)
    return build_profile(inputs, confidence, source=source)


def write_reference_profile(
    version_dir: Path,
    inputs: Mapping[str, np.ndarray],
    probabilities: np.ndarray | None,
    *,
    source: str = "",
) -> dict[str, Any]:
    """Build the reference profile and write it into a (staged) version folder.

    Args:
        version_dir: the version folder being assembled (before `publish_version`).
        inputs: input name -> the training split.
        probabilities: the exported model's probabilities on it, or None.
        source: what the data and the model were.

    Returns:
        The model card's `reference_profile` entry: file name, samples, feature groups and
        whether the confidence is profiled.
    """
    profile = reference_profile(inputs, probabilities, source=source)
    path = write_profile(profile, version_dir)
    logger.info(
        "reference profile %s: %d samples, %d feature groups%s",
        path, profile.samples, len(profile.features),
        " + confidence" if profile.confidence is not None else "",
    )  # fmt: skip
    return {
        "file": PROFILE_FILENAME,
        "samples": profile.samples,
        "source": source,
        "feature_groups": sorted(profile.features)
        + ([CONFIDENCE] if profile.confidence is not None else []),
    }
