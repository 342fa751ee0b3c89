"""The Locust gate against the Ray Serve front door (same locustfile as the plain one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.locust_gate import main
from tests.ray.conftest import RayFrontDoor

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def test_locust_gate_passes_against_the_ray_front_door(
    ray_front_door: RayFrontDoor, ray_repository: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code = main([
        "--host", ray_front_door.address, "--models", "digits", "--users", "2",
        "--run-time", "3s", "--model-repository", str(ray_repository),
        "--slo-ms", "digits=2000", "--out", str(tmp_path),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "locust_stats.csv").is_file() and (tmp_path / "locust.html").is_file()
