"""The Ray Serve front door vs the plain one: start-up, idle RSS, throughput and p99.

    python -m loadtests.ray_bench [--model-repository DIR] [--duration-s 10]
        [--concurrency mlp64=32 minilm=8] [--out loadtests/results/ray_bench.json]

Serves the same repository (mlp64 + minilm; created in a temporary folder when not given,
and removed after) with `batchwire serve` and then with `batchwire serve --ray`, and drives
each model with the same closed-loop gRPC client (loadtests/openloop.py) at the same
concurrency. For Ray it also records the time from launch to the first successful
ModelInfer and the RSS of the whole process tree (driver, GCS, raylet, Serve controller,
proxy, replicas) after 10 s idle. The cost of the hops is measured one request at a time
(`--hop-duration-s`): ServerLive, which the plain server answers in its servicer and Serve
answers in the ingress replica (proxy -> ingress: one hop), and ModelInfer on mlp64 (proxy
-> ingress -> model replica: two hops). Prints tables with the ratios ray/plain and writes
JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from loadtests.minilm_bench import SENTENCE
from loadtests.openloop import run_closed_loop, summarize
from loadtests.perf_analyzer import ROOT, launch_server
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from server.codec import serialize_bytes


def requests() -> dict[str, pb.ModelInferRequest]:
    """One request per model (mlp64: one row; minilm: one sentence as TEXT)."""
    mlp = pb.ModelInferRequest(model_name="mlp64")
    mlp.inputs.add(name="INPUT", datatype="FP32", shape=[1, 64])
    mlp.raw_input_contents.append(np.random.default_rng(0).random((1, 64), np.float32).tobytes())
    text = pb.ModelInferRequest(model_name="minilm")
    text.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    text.raw_input_contents.append(serialize_bytes(np.array([[SENTENCE]], object)))
    return {"mlp64": mlp, "minilm": text}


def ensure_repository(path: Path | None) -> Path:
    """The given repository, or a fresh one with mlp64 and minilm."""
    if path is not None:
        return path
    from trainer.minilm import import_minilm
    from trainer.mlp64 import create_mlp64

    repository = Path(tempfile.mkdtemp(prefix="bw-ray-bench-")) / "repo"
    create_mlp64(repository)
    import_minilm(repository)
    return repository


def measure(address: str, concurrency: dict[str, int], duration_s: float) -> dict[str, Any]:
    out = {}
    for model, request in requests().items():
        result = asyncio.run(
            run_closed_loop(address, request, concurrency[model], duration_s, timeout_s=60.0)
        )
        out[model] = summarize(result)
    return out


def one_at_a_time_ms(address: str, duration_s: float) -> dict[str, dict[str, float]]:
    """p50/p99 latency (ms) of back-to-back ServerLive and mlp64 ModelInfer calls."""
    calls = {
        "ServerLive": ("ServerLive", pb.ServerLiveRequest()),
        "ModelInfer mlp64": ("ModelInfer", requests()["mlp64"]),
    }
    out = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for label, (method, request) in calls.items():
            call = getattr(stub, method)
            for _ in range(20):  # warm-up: connections, first-call paths
                call(request, timeout=10)
            latencies_ns = []
            end = time.monotonic_ns() + int(duration_s * 1e9)
            while (now := time.monotonic_ns()) < end:
                call(request, timeout=10)
                latencies_ns.append(time.monotonic_ns() - now)
            p50, p99 = np.percentile(np.asarray(latencies_ns) / 1e6, [50, 99])
            out[label] = {"p50": float(p50), "p99": float(p99), "calls": len(latencies_ns)}
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def first_success_s(address: str, started: float, timeout_s: float = 180.0) -> float:
    """Seconds from `started` to the first OK ModelInfer on mlp64."""
    request = requests()["mlp64"]
    deadline = started + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                stub.ModelInfer(request, timeout=5)
                return time.monotonic() - started
            except grpc.RpcError:
                time.sleep(0.05)
    raise TimeoutError("the Ray front door never answered")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repository", type=Path, default=None)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--concurrency", nargs="*", default=["mlp64=32", "minilm=8"])
    parser.add_argument("--hop-duration-s", type=float, default=3.0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "loadtests" / "results" / "ray_bench.json"
    )
    args = parser.parse_args(argv)
    concurrency = {k: int(v) for k, v in (item.split("=") for item in args.concurrency)}
    repository = ensure_repository(args.model_repository)
    try:
        return run(args, repository, concurrency, argv)
    finally:
        if args.model_repository is None:
            shutil.rmtree(repository.parent, ignore_errors=True)


def run(
    args: argparse.Namespace, repository: Path, concurrency: dict[str, int], argv: list[str] | None
) -> int:
    """Measure both front doors, print the tables, write the JSON."""
    # NOTE: --no-monitoring: Ray replicas run the runtime without the monitoring hub, so
    # both front doors do the same work and the difference is the Ray path.
    proc, address, _ = launch_server(repository, "--no-monitoring")
    try:
        plain = measure(address, concurrency, args.duration_s)
        plain_hops = one_at_a_time_ms(address, args.hop_duration_s)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    port = free_port()
    # NOTE: a short path of our own for Ray's session (its unix sockets live there).
    temp_dir = tempfile.mkdtemp(prefix="bw-ray-bench-session-")
    env = dict(os.environ, BATCHWIRE_RAY_TMPDIR=temp_dir)
    started = time.monotonic()
    ray_proc = subprocess.Popen(
        [sys.executable, "-m", "batchwire", "--log-level", "WARNING", "serve", "--ray",
         "--model-repository", str(repository), "--port", str(port),
         "--ray-http-port", str(free_port())],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        startup_s = first_success_s(f"127.0.0.1:{port}", started)
        time.sleep(10.0)  # idle
        rss_mib = tree_rss_mib(ray_proc.pid)
        ray = measure(f"127.0.0.1:{port}", concurrency, args.duration_s)
        ray_hops = one_at_a_time_ms(f"127.0.0.1:{port}", args.hop_duration_s)
    finally:
        ray_proc.send_signal(signal.SIGTERM)
        ray_proc.wait(timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)

    print(
        f"closed loop, {args.duration_s:g} s per model; Ray start-up to first OK request "
        f"{startup_s:.1f} s, idle RSS of the Ray process tree {rss_mib:.0f} MiB"
    )
    print(
        f"{'model':<8} {'c':>3} {'plain req/s':>12} {'ray req/s':>10} {'ratio':>6} "
        f"{'plain p99 ms':>13} {'ray p99 ms':>11}"
    )
    rows = []
    for model in requests():
        p, r = plain[model], ray[model]
        ratio = r["achieved_rps"] / p["achieved_rps"] if p["achieved_rps"] else 0.0
        print(
            f"{model:<8} {concurrency[model]:>3} {p['achieved_rps']:>12.0f} "
            f"{r['achieved_rps']:>10.0f} {ratio:>6.2f} {p['latency_ms']['p99']:>13.1f} "
            f"{r['latency_ms']['p99']:>11.1f}"
        )
        rows.append({"model": model, "concurrency": concurrency[model], "plain": p, "ray": r,
                     "ratio_ray_vs_plain": ratio})  # fmt: skip
    print(f"one request at a time, {args.hop_duration_s:g} s per RPC (ms)")
    print(
        f"{'rpc':<17} {'plain p50':>10} {'ray p50':>8} {'ray-plain':>10} "
        f"{'plain p99':>10} {'ray p99':>8}"
    )
    hops = []
    for label, p_hop in plain_hops.items():
        r_hop = ray_hops[label]
        print(
            f"{label:<17} {p_hop['p50']:>10.2f} {r_hop['p50']:>8.2f} "
            f"{r_hop['p50'] - p_hop['p50']:>10.2f} {p_hop['p99']:>10.2f} {r_hop['p99']:>8.2f}"
        )
        hops.append({"rpc": label, "plain_ms": p_hop, "ray_ms": r_hop,
                     "ray_minus_plain_p50_ms": r_hop["p50"] - p_hop["p50"]})  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "command": "python -m loadtests.ray_bench " + " ".join(argv or sys.argv[1:]),
        "load_avg_1m_after": os.getloadavg()[0],
        "ray_startup_to_first_ok_s": startup_s, "ray_idle_rss_mib": rss_mib, "results": rows,
        "one_at_a_time": hops,
    }, indent=2, default=str))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
