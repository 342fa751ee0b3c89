"""Autoscaling: under bounded load digits goes from 1 to 2 replicas, and back to 1 after."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from protos import grpc_service_pb2_grpc as pb_grpc
from tests.ray.conftest import RayFrontDoor
from tests.ray.test_failover import request

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def wait_for_replicas(predicate: object, timeout_s: float) -> int:
    from server.ray_serve import replica_counts

    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while True:
        running = replica_counts().get("digits", 0)
        if predicate(running):
            return running
        if time.monotonic() > deadline:
            raise TimeoutError(f"digits stayed at {running} replicas")
        time.sleep(0.2)


def test_scales_up_under_load_and_back_down_after(ray_front_door: RayFrontDoor) -> None:
    assert wait_for_replicas(lambda n: n == 1, 60) == 1
    stop = threading.Event()
    sent = [0]

    def client() -> None:  # bounded: stops on the event, or after 5,000 requests
        with grpc.insecure_channel(ray_front_door.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(5000):
                if stop.is_set():
                    return
                stub.ModelInfer(request(), timeout=30)
                sent[0] += 1

    # 8 concurrent clients against target_ongoing_requests 2: the autoscaler wants more.
    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        peak = wait_for_replicas(lambda n: n >= 2, 90)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert peak >= 2
    assert wait_for_replicas(lambda n: n == 1, 90) == 1
    print(f"scaled 1 -> {peak} -> 1 replicas with {sent[0]} requests")
