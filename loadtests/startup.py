"""Start-up time and idle memory of `batchwire serve` on a model repository.

    python -m loadtests.startup --model-repository DIR [--runs 3] [--idle-s 5]
        [--out loadtests/results/startup.json]

Start-up is measured from process launch to the server's `serving on` line (models
loaded and warmed, port open) and, as a client sees it, to the first successful
ServerReady; idle RSS is read from /proc after `--idle-s` seconds without traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    """Resident set size of a process (and nothing else), in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def measure_once(repository: Path, idle_s: float) -> dict[str, Any]:
    """One cold start: launch, wait for readiness, idle, read RSS, SIGTERM."""
    import grpc

    from loadtests.perf_analyzer import launch_server
    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc

    start = time.monotonic()
    # Blocks on the server's one stdout line: models loaded and warmed, port open.
    proc, address, models = launch_server(repository)
    serving_s = time.monotonic() - start
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
            ready_s = time.monotonic() - start
            # NOTE: idling is the measurement here (memory after start-up settles).
            time.sleep(idle_s)
            rss = rss_mib(proc.pid)
        return {"serving_line_s": serving_s, "first_ready_s": ready_s, "idle_rss_mib": rss,
                "models": models}  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results" / "startup.json")
    args = parser.parse_args(argv)
    runs = [measure_once(args.model_repository, args.idle_s) for _ in range(args.runs)]
    summary = {
        key: statistics.median(r[key] for r in runs)
        for key in ("serving_line_s", "first_ready_s", "idle_rss_mib")
    }
    print(f"models: {runs[0]['models']}; median of {args.runs} cold starts")
    print(f"{'serving line s':>15} {'first ready s':>14} {'idle RSS MiB':>13}")
    print(f"{summary['serving_line_s']:>15.2f} {summary['first_ready_s']:>14.2f} "
          f"{summary['idle_rss_mib']:>13.0f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "repository": str(args.model_repository), "median": summary, "runs": runs,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
