"""The inline fast path: protobuf in, the model's inline CPU lane, protobuf out.

For a model whose CPU lane runs inline (cheap models such as `mlp64`), the general path's
per-request Python work (an `InferRequest`, validation against the config, an
`InferResponse`, two coroutines) costs as much as the model itself. `InlinePath` serves a
plainly valid request of such a model straight from the protobuf message and gives up
(answers None) on anything else, before doing any work, so that the general path produces
the precise error or runs the request through the batcher.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from batchwire.datatypes import NUMPY_DTYPES
from protos import grpc_service_pb2 as pb
from server.codec import append_outputs
from server.runtime import ModelVersion

#: The response parameter naming the lane (as `ModelRuntime.run` sets it).
LANE_PARAMETER: Final = "batchwire_lane"
#: Response templates kept per fast path (one per sample count seen).
_MAX_TEMPLATES: Final = 64
_OutputSpec = tuple[str, np.dtype[Any], tuple[int, ...]]
"""An output tensor's name, datatype and shape."""


class InlinePath:
    """Serves the requests that the general path would run on a version's inline CPU lane.

    It accepts only what the general path accepts, and runs, counts and observes (drift) a
    request as `ModelRuntime.run` does on the lane: the same engine instance, statistics
    and observer. Anything else makes `infer` answer None before any work: typed
    `contents`, another datatype or shape, an unknown or missing input, more samples than
    the lane takes, a closing model.

    Args:
        model: a version whose CPU lane is inline (see `of`).
    """

    __slots__ = (
        "model", "name", "version", "_lane", "_inputs", "_outputs", "_max_samples", "_template",
        "_answers", "compute_start_ns", "compute_end_ns", "samples", "slo_feed",
    )  # fmt: skip

    def __init__(self, model: ModelVersion) -> None:
        lane = model.lane
        if lane is None or not lane.inline:
            raise ValueError(f"model {model.config.name} has no inline CPU lane")
        self.model = model
        self.name = model.config.name
        """The model's name (one string, its hash computed once: `request.model_name`
        makes a new one at each read)."""
        self.version = str(model.version)
        """The version as the protocol spells it."""
        self.slo_feed: Callable[[int], None] | None = None
        """The SLO monitor's feed of this model's successful requests (`SloMonitor.ok_feeds`),
        kept here by the servicer that monitors it: one slot read a request, not three
        attribute reads and a lookup in a dict subclass."""
        self._lane = lane
        self._inputs = {
            spec.name: (np.dtype(NUMPY_DTYPES[spec.datatype]), spec.dims) for spec in model.inputs
        }
        self._outputs = frozenset(spec.name for spec in model.outputs)
        self._max_samples = min(lane.max_samples, model.config.max_batch_size)
        # Every answer's fields but the id and the outputs.
        self._template = pb.ModelInferResponse(
            model_name=model.config.name, model_version=str(model.version)
        )
        self._template.parameters[LANE_PARAMETER].string_param = "cpu"
        self._answers: dict[int, tuple[pb.ModelInferResponse, tuple[_OutputSpec, ...]]] = {}
        # NOTE: the last lane call's times and size, for trace spans (before the call is
        # decoding, after it encoding), read right after `infer` returns or raises (it
        # runs on the event loop, without awaiting): three slot stores, not an object per
        # request. 0 = the last request failed before or in the lane call.
        self.compute_start_ns = 0
        self.compute_end_ns = 0
        self.samples = 0
        """Samples -> a response template holding the output tensors' metadata (no id, no
        contents), and that metadata as (name, dtype, shape) to check each answer against."""

    @classmethod
    def of(cls, model: ModelVersion) -> InlinePath | None:
        """The fast path of a version, or None when it has none: no inline lane, no batch
        axis, a tokenizer, or an optional or BYTES input."""
        config = model.config
        if (
            model.lane is None
            or not model.lane.inline
            or config.max_batch_size <= 0
            or config.tokenizer is not None
            or any(t.optional or t.datatype == "BYTES" for t in config.inputs)
        ):
            return None
        return cls(model)

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse | None:
        """Run the request on the inline lane now, or answer None (take the general path).

        Args:
            request: the message as received.

        Then `compute_start_ns`, `compute_end_ns` and `samples` hold the lane call's
        start, end and size (0 when it raised).

        Raises:
            InferenceError: the engine failed (counted as the general path counts it).
        """
        model = self.model
        # NOTE: upb repeated fields are sliced once: iterating them is ~3x slower.
        tensors = request.inputs[:]
        raws = request.raw_input_contents[:]
        expected = self._inputs
        # NOTE: request parameters are not looked at: the general path only reads `priority`
        # and `timeout` from them, which matter in the batcher's queue, not on the lane
        # (perf_analyzer sends `triton_enable_empty_final_response` with every request).
        if len(tensors) != len(expected) or len(raws) != len(tensors) or model.batcher.closed:
            return None
        inputs: dict[str, np.ndarray] = {}
        samples = 0
        for tensor, raw in zip(tensors, raws, strict=True):
            name = tensor.name
            spec = expected.get(name)
            if spec is None or name in inputs or tensor.HasField("contents"):
                return None
            dtype, dims = spec
            shape = tuple(tensor.shape[:])
            if NUMPY_DTYPES.get(tensor.datatype) != dtype or len(shape) != len(dims) + 1:
                return None
            n = shape[0]
            if n < 1 or n > self._max_samples or (samples and n != samples):
                return None
            for given, wanted in zip(shape[1:], dims, strict=True):
                if given < 0 or (given != wanted and wanted != -1):
                    return None
            if len(raw) != math.prod(shape) * dtype.itemsize:
                return None
            samples = n
            inputs[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        wanted_outputs = request.outputs
        requested = [o.name for o in wanted_outputs[:]] if wanted_outputs else None
        if requested is not None and not self._outputs.issuperset(requested):
            return None
        start_ns = time.monotonic_ns()
        stats = model.stats
        try:
            outputs = self._lane.run_inline(inputs, samples)
            observer = model.observer
            if outputs is not None and observer is not None:
                observer.lane_countdown -= 1  # NOTE: see ModelObserver: a call 1 in N
                if observer.lane_countdown <= 0:
                    observer.on_lane(inputs, outputs)
        except BaseException as exc:
            self.compute_start_ns = self.compute_end_ns = self.samples = 0
            stats.count_error(exc, time.monotonic_ns() - start_ns)
            raise
        if outputs is None:  # busy (cannot happen on one event loop): the general path
            return None
        end_ns = time.monotonic_ns()
        stats.count_success("cpu", end_ns - start_ns)
        self.compute_start_ns = start_ns
        self.compute_end_ns = end_ns
        self.samples = samples
        if requested is None:
            return self._answer(request.id, outputs, samples)
        out = pb.ModelInferResponse()
        out.CopyFrom(self._template)  # NOTE: half the cost of setting the fields one by one
        out.id = request.id
        append_outputs(out, {name: outputs[name] for name in requested})
        return out

    def _answer(
        self, request_id: str, outputs: dict[str, np.ndarray], samples: int
    ) -> pb.ModelInferResponse:
        """The response carrying every output. The outputs' metadata comes from a template
        per sample count (`append_outputs` costs 1.5 µs more), used while the engine's
        outputs keep the names, datatypes and shapes it was made from."""
        cached = self._answers.get(samples)
        if cached is not None:
            template, specs = cached
            if len(specs) == len(outputs) and all(
                name == spec[0] and array.dtype == spec[1] and array.shape == spec[2]
                for spec, (name, array) in zip(specs, outputs.items(), strict=True)
            ):
                out = pb.ModelInferResponse()
                out.CopyFrom(template)
                out.id = request_id
                out.raw_output_contents.extend([array.tobytes() for array in outputs.values()])
                return out
        out = pb.ModelInferResponse()
        out.CopyFrom(self._template)
        out.id = request_id
        append_outputs(out, outputs)
        # NOTE: BYTES outputs (object arrays) are serialized element by element: no template.
        if all(array.dtype != object for array in outputs.values()):
            template = pb.ModelInferResponse()
            template.CopyFrom(out)
            template.ClearField("id")
            template.ClearField("raw_output_contents")
            if len(self._answers) >= _MAX_TEMPLATES:
                self._answers.clear()
            self._answers[samples] = (
                template,
                tuple((name, array.dtype, array.shape) for name, array in outputs.items()),
            )
        return out
