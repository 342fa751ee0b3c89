"""`mlp64` for the peers: y = relu(x @ W), W 64x64 FP32, in numpy alone (no batchwire import).

It replicates `trainer.mlp64` (a test checks that the weights are equal) so that a peer's
virtual environment needs only numpy.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

NAME: Final = "mlp64"
INPUT_NAME: Final = "INPUT"
OUTPUT_NAME: Final = "OUTPUT"
WIDTH: Final = 64
#: Batching settings comparable to batchwire's mlp64 config (`trainer.mlp64`).
MAX_BATCH_SIZE: Final = 256
MAX_QUEUE_DELAY_US: Final = 100


def mlp64_weights(seed: int = 0) -> npt.NDArray[np.float32]:
    """The seeded 64x64 weight matrix, equal to `trainer.mlp64.mlp64_weights(seed)`."""
    rng = np.random.default_rng(seed)
    weights: npt.NDArray[np.float32] = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
    return weights / np.float32(8.0)


def mlp64_forward(
    x: npt.NDArray[np.float32], weights: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """relu(x @ W) for a batch x of shape [n, 64]; returns [n, 64] FP32."""
    out: npt.NDArray[np.float32] = np.maximum(x @ weights, np.float32(0.0))
    return out
