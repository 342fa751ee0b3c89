"""One local Ray + Serve instance (in this pytest process, the driver) for the `ray` tests.

Skipped with a reason when ray is not installed. The repository is the trained digits
model with a `ray:` block shrunk for tests: small CPU reservations and autoscaling that
reacts within seconds.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="needs ray[serve] (the dev extra installs it)")

from batchwire.config import AutoscalingConfig, RayConfig, load_model_config, write_model_config
from tests.support import free_port


@dataclass(frozen=True)
class RayFrontDoor:
    """What the protocol tests need of a server: its address."""

    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def ray_repository(digits_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("ray_repo")
    shutil.copytree(digits_repository / "digits", repository / "digits")
    config = load_model_config(repository / "digits")
    config = config.model_copy(
        update={
            "ray": RayConfig(
                num_cpus=0.25,
                autoscaling=AutoscalingConfig(
                    min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                    upscale_delay_s=0.5, downscale_delay_s=3, look_back_period_s=1,
                ),
            )
        }
    )  # fmt: skip
    write_model_config(repository / "digits", config)
    return repository


@pytest.fixture(scope="session")
def ray_front_door(ray_repository: Path) -> Iterator[RayFrontDoor]:
    import ray
    from ray import serve

    from server.ray_serve import RayServeSettings, start_local

    port = free_port()
    # NOTE: a short path of our own: Ray's unix sockets live in it (107-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="bw-ray-test-"))
    start_local(
        RayServeSettings(
            model_repository=ray_repository, port=port, http_port=free_port(), num_cpus=2,
            temp_dir=temp_dir,
        )
    )  # fmt: skip
    try:
        yield RayFrontDoor(port)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server_process(ray_front_door: RayFrontDoor) -> RayFrontDoor:
    """Overrides tests/conftest.py's plain server: the imported protocol tests use this."""
    return ray_front_door
