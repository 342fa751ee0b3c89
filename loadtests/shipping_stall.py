"""How long the tracer's shipping keeps the event loop from the GIL.

    python -m loadtests.shipping_stall [--records 2000] [--flushes 5]

The shipper thread turns a backlog of request records into JSON lines while the event
loop goes on serving. Whenever the loop comes back from a wait that released the GIL
(epoll), it must wait until the shipper lets go of it: up to the interpreter's switch
interval (5 ms) if the shipper never does. This measures that directly: this thread plays
the loop (100 µs `select` waits, back to back) while another thread runs
`RequestTracer.flush` on `--records` CPU-lane request records, and reports the longest
and median time one of its waits took, for the tracer as it is and with its GIL-releasing
measure taken out: the whole backlog in one chunk, with no hand-over
(`tracing.SHIP_CHUNK` and `_PACKED_CHUNK`, `tracing._hand_over_gil`).
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loadtests.monitoring_overhead import write_results
from loadtests.perf_analyzer import ROOT

#: Variants: (name, ship in chunks of SHIP_CHUNK records with the GIL handed over between).
VARIANTS = (
    ("one chunk, no hand-over", False),
    ("as shipped", True),
)


@contextmanager
def _variant(chunks: bool) -> Iterator[None]:
    from monitoring import tracing

    saved = tracing._hand_over_gil, tracing.SHIP_CHUNK, tracing._PACKED_CHUNK
    if not chunks:
        tracing._hand_over_gil = lambda: None
        tracing.SHIP_CHUNK = tracing._PACKED_CHUNK = 1 << 62  # type: ignore[misc]
    try:
        yield
    finally:
        tracing._hand_over_gil, tracing.SHIP_CHUNK, tracing._PACKED_CHUNK = saved  # type: ignore[misc]


def measure(records: int, flushes: int, work: Path) -> dict[str, list[dict[str, float]]]:
    """Per variant and flush: the flush's length and the loop's longest and median wait."""
    from monitoring.tracing import RequestTracer, TracingSettings

    # The in-process shipper (what holds the GIL while it encodes); a shipper process's
    # thread only hands records over.
    tracer = RequestTracer(
        TracingSettings(flush_interval_s=3600, trace_file=work / "s.jsonl", shipper="thread")
    )
    method = "inference.GRPCInferenceService/ModelInfer"
    read_end, write_end = os.pipe()
    out: dict[str, list[dict[str, float]]] = {}
    try:
        for _ in range(flushes):
            for name, chunks in VARIANTS:
                for _ in range(records):  # as the inline CPU lane records them (packed)
                    tracer.record_request(None, method, "mlp64", "1", "cpu", 1, "", "OK",
                                          1_000, 1_500, 1_500, 1_800, 1_800, 2_000)  # fmt: skip
                waits: list[int] = []
                with _variant(chunks):
                    shipper = threading.Thread(target=tracer.flush)
                    started = time.perf_counter()
                    shipper.start()
                    while True:  # at least one wait, however short the flush
                        before = time.perf_counter_ns()
                        select.select([read_end], [], [], 0.0001)
                        waits.append(time.perf_counter_ns() - before)
                        if not shipper.is_alive():
                            break
                    shipper.join()
                out.setdefault(name, []).append(
                    {"flush_ms": (time.perf_counter() - started) * 1000,
                     "longest_wait_us": max(waits) / 1000,
                     "median_wait_us": statistics.median(waits) / 1000}
                )  # fmt: skip
    finally:
        os.close(read_end)
        os.close(write_end)
        tracer.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--flushes", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "loadtests" / "results" / "shipping_stall.json"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batchwire-stall-") as tmp:
        results = measure(args.records, args.flushes, Path(tmp))
    print(f"{args.records} CPU-lane records flushed to the JSON-lines file, "
          f"{args.flushes} flushes per variant; the loop's 100 µs waits meanwhile")  # fmt: skip
    print(f"{'variant':>24} {'flush ms':>9} {'longest wait µs (per flush)':>40} {'median':>7}")
    table: list[dict[str, Any]] = []
    for name, flushes in results.items():
        longest = [f["longest_wait_us"] for f in flushes]
        print(
            f"{name:>24} {statistics.median(f['flush_ms'] for f in flushes):>9.1f} "
            f"{' '.join(f'{x:.0f}' for x in longest):>40} "
            f"{statistics.median(f['median_wait_us'] for f in flushes):>7.0f}"
        )
        table.append({"variant": name, "flushes": flushes})
    write_results(args.out, "loadtests.shipping_stall", argv, records=args.records,
                  results=table)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
