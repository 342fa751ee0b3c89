"""The `Engine` protocol: the narrow seam between the batcher and a model runtime."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from batchwire.types import TensorSpec


@runtime_checkable
class Engine(Protocol):
    """A loaded model that maps named input arrays to named output arrays.

    Contract: `infer` is synchronous and thread-confined (the batcher calls one engine
    instance from one thread at a time, off the event loop). When `max_batch_size > 0`,
    axis 0 of every input and output is the batch axis and outputs keep the input's
    batch size.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch and return every declared output."""
        ...

    def warmup(self) -> None:
        """Run a representative batch once so the first real request is not slow."""
        ...
