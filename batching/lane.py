"""`CpuLane`: a bounded pool of engine instances that runs cheap requests at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from batchwire.errors import ErrorCode, InferenceError
from engines.base import Engine

Outputs = dict[str, np.ndarray]


class CpuLane:
    """Runs eligible requests immediately, with no queue and no batching delay.

    `try_run` never waits for an instance: when none is free it answers None and the
    caller sends the request to the dynamic batcher instead, so the lane is bounded by
    its instance count and overload turns into batches rather than a queue here.

    Args:
        engines: one engine per instance (ignored beyond the first when `inline`).
        max_samples: largest request (in samples) the lane takes.
        inline: run on the event loop thread (for microsecond-cheap models).
        name: for thread names.
    """

    def __init__(
        self, engines: Sequence[Engine], *, max_samples: int, inline: bool = False, name: str = ""
    ) -> None:
        if not engines:
            raise ValueError("a CPU lane needs at least one engine instance")
        self.engines = list(engines)
        self.max_samples = max_samples
        self.inline = inline
        self.name = name
        self.requests_total = 0
        self.samples_total = 0
        self.compute_ns_total = 0
        self._free = list(range(len(self.engines)))
        self._executors = (
            []
            if inline
            else [
                ThreadPoolExecutor(1, thread_name_prefix=f"cpu-lane-{name}-{i}")
                for i in range(len(self.engines))
            ]
        )
        self._busy_inline = False

    async def try_run(self, inputs: dict[str, np.ndarray], samples: int) -> Outputs | None:
        """Run the request now if it is eligible and an instance is free, else None.

        Raises:
            InferenceError: the engine's own error, or INTERNAL for any other failure.
        """
        if self.inline:
            return self.run_inline(inputs, samples)
        if samples > self.max_samples:
            return None
        if not self._free:
            return None
        instance = self._free.pop()
        start = time.monotonic_ns()
        try:
            loop = asyncio.get_running_loop()
            engine = self.engines[instance]
            return await loop.run_in_executor(self._executors[instance], _checked, engine, inputs)
        finally:
            self._free.append(instance)
            self._count(samples, start)

    def run_inline(self, inputs: dict[str, np.ndarray], samples: int) -> Outputs | None:
        """`try_run` of an inline lane, without a coroutine: run on the calling thread (the
        event loop) now if the request is eligible, else None.

        Raises:
            InferenceError: the engine's own error, or INTERNAL for any other failure.
        """
        # NOTE: re-entrancy cannot happen on one event loop, but stay safe.
        if samples > self.max_samples or self._busy_inline or not self.inline:
            return None
        self._busy_inline = True
        start = time.monotonic_ns()
        try:
            return _checked(self.engines[0], inputs)
        finally:
            self._busy_inline = False
            self._count(samples, start)

    def _count(self, samples: int, start_ns: int) -> None:
        self.requests_total += 1
        self.samples_total += samples
        self.compute_ns_total += time.monotonic_ns() - start_ns

    def close(self) -> None:
        """Release the lane's threads (in-flight requests finish first)."""
        for executor in self._executors:
            executor.shutdown(wait=True)


def _checked(engine: Engine, inputs: dict[str, np.ndarray]) -> Outputs:
    try:
        return engine.infer(inputs)
    except InferenceError:
        raise
    except Exception as exc:
        raise InferenceError(ErrorCode.INTERNAL, f"engine failed: {exc}") from exc
