"""mlp64, the serving-overhead probe: the published ONNX graph computes relu(x @ W)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from batchwire.cli import main
from batchwire.config import load_model_config
from engines.loader import load_engine
from trainer.mlp64 import mlp64_weights


def test_cli_publishes_mlp64_and_the_engine_computes_relu_xw(tmp_path: Path) -> None:
    assert main(["train", "mlp64", "--model-repository", str(tmp_path), "--seed", "3"]) == 0
    assert main(["train", "mlp64", "--model-repository", str(tmp_path), "--seed", "3"]) == 0
    model_dir = tmp_path / "mlp64"
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) == [
        "1", "2", "config.yaml",
    ]  # fmt: skip
    config = load_model_config(model_dir)
    assert config.max_batch_size == 256 and config.inputs[0].dims == [64]
    engine = load_engine(config, model_dir / "2")
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    expected = np.maximum(x @ mlp64_weights(3), 0)
    np.testing.assert_allclose(engine.infer({"INPUT": x})["OUTPUT"], expected, rtol=1e-5, atol=1e-6)
