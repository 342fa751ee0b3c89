"""`serve --workers 2`: two processes share one port and both answer; SIGTERM stops all."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import numpy as np

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import start_server


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_two_workers_share_the_port_and_stop_on_sigterm(
    digits_repository: Path, tmp_path: Path
) -> None:
    server = start_server(digits_repository, tmp_path / "log", "--workers", "2")
    try:
        workers = children(server.process.pid)
        assert len(workers) == 2
        x = np.zeros((1, 1, 8, 8), np.float32)
        request = pb.ModelInferRequest(model_name="digits", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="INPUT", datatype="FP32", shape=x.shape)
        counts = []
        # Each channel is a new TCP connection, which the kernel hands to either worker;
        # each worker counts only its own requests.
        for _ in range(16):
            # NOTE: a subchannel of its own: grpc otherwise may hand a new channel the
            # previous one's connection (the global subchannel pool), i.e. the same worker.
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(server.address, options=options) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                stub.ModelInfer(request)
                stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"))
                counts.append(stats.model_stats[0].inference_count)
        # One process would count 1..16; two give repeated counts (odds of all 16
        # connections landing on one worker: 2**-15).
        assert sorted(counts) != list(range(1, 17)), counts
    finally:
        assert server.terminate() == 0
    for pid in workers:
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
