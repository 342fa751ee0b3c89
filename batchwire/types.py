"""Plain dataclasses that cross the front door -> runtime -> batcher seams (no protobuf)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared model input or output.

    `dims` excludes the batch dimension when the model batches (Triton convention);
    -1 marks a variable-size dimension.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass(slots=True)
class InferRequest:
    """One decoded inference request.

    Attributes:
        inputs: name -> array; when the model batches, axis 0 is the batch axis.
        requested_outputs: output names the client asked for; None means all.
        id: the client's request id, echoed in the response.
        deadline_ns: absolute `time.monotonic_ns()` after which the result is useless; None = none.
        priority: 0 = the model's default level; lower numbers are served first.
        parameters: request-level parameters (plain Python values).
    """

    inputs: dict[str, np.ndarray]
    requested_outputs: list[str] | None = None
    id: str = ""
    deadline_ns: int | None = None
    priority: int = 0
    parameters: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class RequestTiming:
    """Where one request's time went, on the `time.monotonic_ns()` clock.

    A front door that wants it (for trace spans) passes one to `ModelRuntime.infer`; the
    runtime and the batcher fill it in. Zero means "did not happen" (a CPU-lane request
    is never queued).
    """

    queued_ns: int = 0
    """Entered the batcher's queue (set at once: a request dropped there has it too)."""
    compute_start_ns: int = 0
    """Its batch (or its CPU-lane call) started on an engine."""
    compute_end_ns: int = 0
    """The engine returned."""
    batch_samples: int = 0
    """Samples in the batch it ran in (its own size on the CPU lane)."""
    batch_requests: int = 0
    """Requests in that batch."""


@dataclass(slots=True)
class InferResponse:
    """The result of one `InferRequest`: outputs keep the request's batch size on axis 0.

    `parameters` travel back as response parameters (e.g. which lane served it).
    """

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    id: str = ""
    parameters: dict[str, str | int | bool] = field(default_factory=dict)
