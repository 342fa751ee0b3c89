"""Deployment options from config.yaml and the Serve config file (no Ray instance needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from batchwire.cli import main
from batchwire.config import AutoscalingConfig, RayConfig, load_model_config
from server.ray_serve import SERVICER_FUNCTION, deployment_options

pytestmark = pytest.mark.ray


def test_options_follow_the_ray_block(ray_repository: Path) -> None:
    config = load_model_config(ray_repository / "digits")
    options = deployment_options(config)
    assert options["name"] == "digits"
    assert options["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 0.0}
    scaling = options["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 2)
    assert scaling["target_ongoing_requests"] == 2 and scaling["upscale_delay_s"] == 0.5
    assert "num_replicas" not in options
    # Room for a full batch queued while another computes.
    assert options["max_ongoing_requests"] >= config.max_batch_size * (config.instance_count + 1)


def test_fixed_replicas_and_gpu_reservation(ray_repository: Path) -> None:
    config = load_model_config(ray_repository / "digits").model_copy(
        update={"ray": RayConfig(num_gpus=1, num_replicas=3, max_ongoing_requests=40)}
    )
    options = deployment_options(config)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert options["max_ongoing_requests"] == 40
    assert AutoscalingConfig().max_replicas >= AutoscalingConfig().min_replicas


def test_ray_config_command_writes_a_serve_config(tmp_path: Path) -> None:
    out = tmp_path / "serve.yaml"
    assert main(["ray-config", "--model-repository", "/models", "--port", "9001",
                 "--out", str(out)]) == 0  # fmt: skip
    config = yaml.safe_load(out.read_text())
    assert config["grpc_options"] == {"port": 9001, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    (app,) = config["applications"]
    assert app["route_prefix"] == "/"  # without one, clients would need application metadata
    assert app["import_path"] == "server.ray_serve:build_app"
    assert app["args"] == {"model_repository": "/models"}
    main(["ray-config", "--ingress-replicas", "3", "--out", str(out)])
    assert yaml.safe_load(out.read_text())["applications"][0]["args"]["ingress_replicas"] == 3


def test_kuberay_manifest_carries_the_generated_serve_config(tmp_path: Path) -> None:
    out = tmp_path / "serve.yaml"
    assert main(["ray-config", "--out", str(out)]) == 0
    manifest = yaml.safe_load(
        (Path(__file__).parents[2] / "deploy" / "rayservice.yaml").read_text()
    )
    assert manifest["kind"] == "RayService"
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == yaml.safe_load(out.read_text())
