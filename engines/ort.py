"""`OrtEngine`: runs an ONNX model with ONNX Runtime on the CPU execution provider."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec
from engines.loader import zero_inputs

logger = logging.getLogger(__name__)

#: ONNX Runtime's type string -> v2 datatype label.
ORT_DATATYPES: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class OrtEngine:
    """An ONNX model in an `onnxruntime.InferenceSession` (CPU, sequential, fully optimised).

    Construction checks the model against the declared tensors (names, datatypes, ranks),
    so a wrong `config.yaml` fails at load time rather than on the first request.

    Args:
        path: the `.onnx` file.
        inputs: declared inputs (dims exclude the batch axis when `max_batch_size > 0`).
        outputs: declared outputs; `infer` returns exactly these, in this order.
        max_batch_size: largest batch in samples; 0 = the model has no batch axis.
        intra_op_threads: ONNX Runtime intra-op threads (1 avoids oversubscribing small hosts).

    Raises:
        InferenceError: INTERNAL when the file cannot be loaded or does not match the
            declared tensors.
    """

    def __init__(
        self,
        path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        max_batch_size: int,
        *,
        intra_op_threads: int = 1,
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.max_batch_size = max_batch_size
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise InferenceError(
                ErrorCode.INTERNAL, f"cannot load ONNX model {self.path}: {exc}"
            ) from exc
        self._check("input", inputs, self._session.get_inputs(), exact=True)
        self._check("output", outputs, self._session.get_outputs(), exact=False)
        # Prebuilt once: `infer` passes it straight to `session.run`.
        self._output_names = [spec.name for spec in outputs]
        # NOTE: the binding's own run where this onnxruntime has one (`_sess`, 1.18 to at
        # least 1.2x): `InferenceSession.run` re-checks the feed in Python on every call
        # (names, OrtValue ownership, graph capture: a few µs, a third of a 64x64 model's
        # call). The runtime has validated names, datatypes and shapes already, and the
        # binding still rejects a bad feed with InvalidArgument; the wrapper's provider
        # fallback does not apply to a CPU-only session.
        binding = getattr(self._session, "_sess", None)
        self._run: Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]] = (
            (lambda names, feed: binding.run(names, feed, None))
            if binding is not None and callable(getattr(binding, "run", None))
            else self._session.run
        )
        logger.debug("loaded %s (%d intra-op threads)", self.path, intra_op_threads)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch and return every declared output (declared datatypes, batch kept).

        Raises:
            InferenceError: INVALID_INPUT when ONNX Runtime rejects an input (name, dtype,
                shape); INTERNAL for any other runtime failure.
        """
        try:
            results = self._run(self._output_names, inputs)
        except InvalidArgument as exc:
            raise InferenceError(ErrorCode.INVALID_INPUT, str(exc)) from exc
        except Exception as exc:
            raise InferenceError(ErrorCode.INTERNAL, f"ONNX Runtime failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def warmup(self) -> None:
        """Run one batch of size 1 of zeros (variable dims as 1)."""
        self.infer(zero_inputs(self.inputs, self.max_batch_size))

    def _check(
        self, kind: str, declared: tuple[TensorSpec, ...], actual: list[Any], *, exact: bool
    ) -> None:
        """Compare declared tensors with the model's (`onnxruntime.NodeArg`s)."""
        by_name = {arg.name: arg for arg in actual}
        names = [spec.name for spec in declared]
        missing = [name for name in names if name not in by_name]
        extra = sorted(set(by_name) - set(names)) if exact else []
        if missing or extra:
            raise InferenceError(
                ErrorCode.INTERNAL,
                f"{self.path}: declared {kind}s {names} do not match the model's "
                f"{list(by_name)} (missing {missing}, undeclared {extra})",
            )
        batch_axes = 1 if self.max_batch_size > 0 else 0
        for spec in declared:
            arg = by_name[spec.name]
            datatype = ORT_DATATYPES.get(arg.type, arg.type)
            if datatype != spec.datatype:
                raise InferenceError(
                    ErrorCode.INTERNAL,
                    f"{self.path}: {kind} '{spec.name}' is {datatype} in the model but "
                    f"declared {spec.datatype}",
                )
            model_dims = list(arg.shape)[batch_axes:]
            if len(arg.shape) != len(spec.dims) + batch_axes or any(
                isinstance(m, int) and d >= 0 and m != d
                for m, d in zip(model_dims, spec.dims, strict=False)
            ):
                raise InferenceError(
                    ErrorCode.INTERNAL,
                    f"{self.path}: {kind} '{spec.name}' has shape {arg.shape} in the model; "
                    f"declared dims {list(spec.dims)} with max_batch_size {self.max_batch_size}",
                )
