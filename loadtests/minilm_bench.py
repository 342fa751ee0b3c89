"""minilm: served throughput at concurrency C vs the raw engine's best batch, one run.

    python -m loadtests.minilm_bench --model-repository DIR [--concurrency 32]
        [--duration-s 15] [--batch-sizes 1 8 16 32] [--out loadtests/results/minilm.json]

Raw: the same engine the server builds (tokenisation included, 1 intra-op thread) on
batches of the benchmark sentence, no server; the best batch size wins. Served: a
closed loop of `--concurrency` clients each sending one sentence as TEXT to
`batchwire serve`; the dynamic batcher's mean batch size comes from ModelStatistics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: About 32 tokens once tokenised (FACTS measured the raw engine at 32 tokens).
SENTENCE = (
    "Dynamic batching groups concurrent inference requests into one engine call, trading "
    "a little queueing delay for much higher throughput on the same hardware."
)


def raw_throughput(repository: Path, batch_sizes: list[int], seconds: float) -> dict[int, float]:
    """Sentences/s of the server's own engine at each batch size (no server)."""
    from batchwire.config import load_model_config, version_dirs
    from engines.loader import load_engine

    model_dir = repository / "minilm"
    config = load_model_config(model_dir)
    engine = load_engine(config, version_dirs(model_dir)[max(version_dirs(model_dir))])
    engine.warmup()
    result = {}
    for size in batch_sizes:
        batch = {"TEXT": np.array([[SENTENCE.encode()]] * size, dtype=np.object_)}
        engine.infer(batch)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            engine.infer(batch)
            count += size
        result[size] = count / (time.perf_counter() - start)
    return result


def served(repository: Path, concurrency: int, duration_s: float) -> dict[str, Any]:
    """Closed-loop TEXT requests against a fresh server; throughput, latency, batch size."""
    import grpc

    from loadtests.openloop import run_closed_loop, summarize
    from loadtests.perf_analyzer import start_server
    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc
    from server.codec import serialize_bytes

    proc, address = start_server(repository)
    try:
        request = pb.ModelInferRequest(model_name="minilm")
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(serialize_bytes(np.array([[SENTENCE]], object)))

        def counts() -> tuple[int, int]:
            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="minilm"))
                return stats.model_stats[0].inference_count, stats.model_stats[0].execution_count

        before = counts()
        result = summarize(
            asyncio.run(run_closed_loop(address, request, concurrency, duration_s, timeout_s=30.0))
        )
        after = counts()
        samples, executions = after[0] - before[0], after[1] - before[1]
        result["mean_batch_size"] = samples / executions if executions else 0.0
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--raw-seconds", type=float, default=5.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results" / "minilm.json")
    args = parser.parse_args(argv)

    raw = raw_throughput(args.model_repository, args.batch_sizes, args.raw_seconds)
    best_size = max(raw, key=lambda size: raw[size])
    run = served(args.model_repository, args.concurrency, args.duration_s)
    ratio = run["achieved_rps"] / raw[best_size]
    print("raw engine (tokenisation included, 1 intra-op thread), sentences/s by batch size:")
    print("  " + ", ".join(f"bs{k}: {v:.1f}" for k, v in raw.items()))
    print(f"served, closed loop c={args.concurrency}, {args.duration_s:.0f} s:")
    latency = run["latency_ms"]
    print(f"  {run['achieved_rps']:.1f} sentences/s, p50 {latency['p50']:.1f} ms, "
          f"p99 {latency['p99']:.1f} ms, errors {run['errors']}, "
          f"mean batch size {run['mean_batch_size']:.1f}")  # fmt: skip
    print(f"served / raw best (bs{best_size}): {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "raw_sentences_per_s": raw, "best_batch_size": best_size, "served": run,
        "served_over_raw": ratio, "concurrency": args.concurrency,
    }, indent=2, default=str))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
