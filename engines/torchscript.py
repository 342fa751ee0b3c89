"""`TorchScriptEngine`: runs a TorchScript module (`torch.jit.load`) on the CPU or a CUDA GPU."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Final

import numpy as np
import torch

from batchwire.datatypes import numpy_dtype
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec
from engines.loader import zero_inputs

logger = logging.getLogger(__name__)

#: Warm-up runs: TorchScript's profiling executor optimises the graph on a later call.
WARMUP_RUNS: Final = 3


class TorchScriptEngine:
    """A TorchScript module, run from and to numpy arrays.

    The module takes the declared inputs positionally, in declared order, and returns a
    tensor or a tuple of tensors in declared output order.

    Arrays enter through `torch.from_numpy` (no copy on the CPU, except for read-only
    arrays, which torch cannot wrap safely) and leave through `.numpy()`.

    NOTE: `torch.set_num_threads` is process-global: the constructor sets it to
    `intra_op_threads`, so the last TorchScript engine built decides the intra-op threads of
    every TorchScript engine (and any other torch work) in the process.

    Args:
        path: the `.pt` file saved by `torch.jit.save`.
        inputs: declared inputs (dims exclude the batch axis when `max_batch_size > 0`).
        outputs: declared outputs, in the order the module returns them.
        max_batch_size: largest batch in samples; 0 = the model has no batch axis.
        intra_op_threads: torch intra-op threads (process-global, see the note above).
        device: "cpu" or a CUDA device ("cuda", "cuda:1").

    Raises:
        InferenceError: UNAVAILABLE when a CUDA device is asked for and none is available;
            INTERNAL when the file cannot be loaded.
    """

    def __init__(
        self,
        path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        max_batch_size: int,
        *,
        intra_op_threads: int = 1,
        device: str = "cpu",
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.max_batch_size = max_batch_size
        self.path = Path(path)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InferenceError(ErrorCode.UNAVAILABLE, f"device '{device}': CUDA is not available")
        torch.set_num_threads(intra_op_threads)
        self._module = load_torchscript(self.path, self.device)
        self._input_names = [spec.name for spec in inputs]
        self._outputs = [(spec.name, numpy_dtype(spec.datatype)) for spec in outputs]
        self._on_cpu = self.device.type == "cpu"
        logger.debug(
            "loaded %s on %s (%d intra-op threads)", self.path, self.device, intra_op_threads
        )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch and return every declared output (declared datatypes, batch kept).

        Raises:
            InferenceError: INVALID_INPUT when a declared input is missing; INTERNAL when the
                module fails or returns a different number of outputs than declared.
        """
        try:
            arrays = [inputs[name] for name in self._input_names]
        except KeyError as exc:
            raise InferenceError(ErrorCode.INVALID_INPUT, f"missing input {exc}") from exc
        try:
            with torch.inference_mode():
                result = self._module(*(self._tensor(a) for a in arrays))
                if isinstance(result, torch.Tensor):
                    result = (result,)
                if len(result) != len(self._outputs):
                    raise InferenceError(
                        ErrorCode.INTERNAL,
                        f"{self.path} returned {len(result)} outputs, "
                        f"declared {len(self._outputs)}",
                    )
                return {
                    name: self._array(tensor, dtype)
                    for (name, dtype), tensor in zip(self._outputs, result, strict=True)
                }
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(ErrorCode.INTERNAL, f"TorchScript failed: {exc}") from exc

    def warmup(self) -> None:
        """Run a batch of size 1 of zeros (variable dims as 1) `WARMUP_RUNS` times."""
        sample = zero_inputs(self.inputs, self.max_batch_size)
        for _ in range(WARMUP_RUNS):
            self.infer(sample)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        if not array.flags.writeable:
            # NOTE: torch would share (and warn about) a read-only buffer, e.g. np.frombuffer.
            array = array.copy()
        tensor = torch.from_numpy(array)
        return tensor if self._on_cpu else tensor.to(self.device)

    def _array(self, tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
        array = tensor.numpy() if self._on_cpu else tensor.cpu().numpy()
        return array if array.dtype == dtype else array.astype(dtype)


def load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    """`torch.jit.load` onto `device`, in eval mode.

    Raises:
        InferenceError: INTERNAL when the file cannot be loaded.
    """
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in torch but is the libtorch format we serve on purpose.
            warnings.filterwarnings(
                "ignore",
                message=r"`torch\.jit\.load` is deprecated",
                category=DeprecationWarning,
            )
            module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise InferenceError(
            ErrorCode.INTERNAL, f"cannot load TorchScript model {path}: {exc}"
        ) from exc
    return module.eval()  # type: ignore[no-any-return]
