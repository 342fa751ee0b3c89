"""Train the digits CNN, export it to TorchScript and ONNX, and publish it as a model version."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import torch
from torch import nn
from tqdm import tqdm

from batchwire.config import (
    DriftConfig,
    DynamicBatchingConfig,
    ModelConfig,
    SloConfig,
    TensorConfig,
)
from engines.loader import ENGINE_FILENAMES
from trainer.data import (
    IMAGE_SHAPE,
    MAX_INTENSITY,
    NUM_CLASSES,
    TEST_FRACTION,
    dataset_sha256,
    load_digits_split,
)
from trainer.profile import write_reference_profile
from trainer.publish import file_sha256, next_version, publish_version, staging_dir

logger = logging.getLogger(__name__)

MODEL_NAME: Final = "digits"
INPUT_NAME: Final = "INPUT"
PROBABILITIES_NAME: Final = "PROBABILITIES"
LABEL_NAME: Final = "LABEL"

# Serving settings written to config.yaml.
MAX_BATCH_SIZE: Final = 64
PREFERRED_BATCH_SIZES: Final = (16, 32)
MAX_QUEUE_DELAY_US: Final = 500
MAX_QUEUE_SIZE: Final = 1024
INSTANCE_COUNT: Final = 1
INTRA_OP_THREADS: Final = 1
#: Latency objective: 99% of requests within this (server-side), on a 2-core host.
SLO_LATENCY_MS: Final = 50.0

# Training defaults: 30 epochs reach ~98% held-out accuracy in ~3 s on one core.
DEFAULT_EPOCHS: Final = 30
DEFAULT_BATCH_SIZE: Final = 64
DEFAULT_LEARNING_RATE: Final = 2e-3

ONNX_OPSET: Final = 17
MODEL_CARD_FILENAME: Final = "model_card.json"
#: Largest difference in a probability allowed between the eager model and an exported one.
EXPORT_ATOL: Final = 1e-5
#: Deprecation warnings torch raises for the formats we export on purpose (TorchScript for the
#: libtorch backend, the one-file legacy ONNX exporter); silenced only around those calls.
TORCHSCRIPT_DEPRECATIONS: Final = (
    r"`torch\.jit\.\w+` is deprecated",
    r"You are using the legacy TorchScript-based ONNX export",
    r"The feature will be removed",
)


ARCHITECTURE: Final = (
    "conv3x3(1->16)-relu-conv3x3(16->32)-relu-maxpool2-fc(512->64)-relu-fc(64->10)"
)


class ExportMismatchError(RuntimeError):
    """An exported model's outputs differ from the eager model's on the test set."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What `train_digits` published.

    Attributes:
        model_dir: `<model_repository>/digits`.
        version: the new version number.
        version_dir: `<model_dir>/<version>`, holding the model files and `model_card.json`.
        test_accuracy: accuracy on the held-out split (the same for every exported format).
        train_time_s: seconds spent in the training loop (export and checks excluded).
        parameter_count: trainable parameters of the network.
        card: the contents of `model_card.json`.
    """

    model_dir: Path
    version: int
    version_dir: Path
    test_accuracy: float
    train_time_s: float
    parameter_count: int
    card: dict[str, Any]


class DigitsCNN(nn.Module):
    """A small CNN (38,282 parameters) mapping raw 8x8 intensities (0..16) to 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10] of raw images [N, 1, 8, 8]; normalisation happens here, in the graph."""
        logits: torch.Tensor = self.classifier(self.features(images / MAX_INTENSITY))
        return logits


class DigitsServing(nn.Module):
    """The exported form: raw images in, (`PROBABILITIES` [N, 10], `LABEL` [N, 1] int64) out."""

    def __init__(self, net: DigitsCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities and their argmax (so LABEL always agrees with PROBABILITIES)."""
        probabilities = torch.softmax(self.net(images), dim=1)
        return probabilities, torch.argmax(probabilities, dim=1, keepdim=True)


def digits_config() -> ModelConfig:
    """The `config.yaml` contents of the digits model (ONNX Runtime backend)."""
    return ModelConfig(
        name=MODEL_NAME,
        backend="onnxruntime",
        max_batch_size=MAX_BATCH_SIZE,
        inputs=[TensorConfig(name=INPUT_NAME, datatype="FP32", dims=list(IMAGE_SHAPE))],
        outputs=[
            TensorConfig(name=PROBABILITIES_NAME, datatype="FP32", dims=[NUM_CLASSES]),
            TensorConfig(name=LABEL_NAME, datatype="INT64", dims=[1]),
        ],
        dynamic_batching=DynamicBatchingConfig(
            preferred_batch_size=list(PREFERRED_BATCH_SIZES),
            max_queue_delay_us=MAX_QUEUE_DELAY_US,
            max_queue_size=MAX_QUEUE_SIZE,
        ),
        instance_count=INSTANCE_COUNT,
        intra_op_threads=INTRA_OP_THREADS,
        slo=SloConfig(latency_threshold_ms=SLO_LATENCY_MS),
        drift=DriftConfig(confidence_output=PROBABILITIES_NAME),
    )


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters of `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def train_digits(
    model_repository: Path,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LEARNING_RATE,
    progress: bool = True,
    version: int | None = None,
) -> TrainResult:
    """Train the digits CNN and publish it as `<model_repository>/digits/<version>/`.

    The same arguments always produce the same weights (seeded, deterministic, one thread).
    The version folder is assembled in a hidden staging folder next to it and renamed into
    place, so a server scanning the repository never sees a half-written version.
    `config.yaml` is (over)written atomically before the version appears.

    Args:
        model_repository: root of the model repository (created if absent).
        epochs: passes over the training split.
        seed: seeds the split, the weight initialisation and the shuffling.
        batch_size: training mini-batch size, in samples.
        lr: Adam learning rate.
        progress: show a tqdm bar (on stderr) with the loss and accuracy of each epoch.
        version: version number to publish; None = 1 + the highest existing version.

    Returns:
        What was published, with the held-out accuracy.

    Raises:
        FileExistsError: the version folder already exists.
        ExportMismatchError: ONNX Runtime or TorchScript disagree with the eager model.
        ValueError: an argument is out of range.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}"
        )
    if version is not None and version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    model_dir = Path(model_repository) / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is not None and (model_dir / str(version)).exists():
        raise FileExistsError(f"{model_dir / str(version)} already exists")

    x_train, x_test, y_train, y_test = load_digits_split(seed)
    with _deterministic_torch(seed):
        net = DigitsCNN()
        start_ns = time.monotonic_ns()
        final_loss = _fit(net, x_train, y_train, epochs, batch_size, lr, seed, progress)
        train_time_s = (time.monotonic_ns() - start_ns) / 1e9
        serving = DigitsServing(net).eval()
        with torch.inference_mode():
            eager_probs_t, eager_labels_t = serving(torch.from_numpy(x_test))
        eager_probs, eager_labels = eager_probs_t.numpy(), eager_labels_t.numpy()
        test_accuracy = float(np.mean(eager_labels[:, 0] == y_test))

        with staging_dir(model_dir) as staging:
            onnx_path, pt_path = _export(serving, torch.from_numpy(x_test[:2]), staging)
            max_diff = {
                "onnxruntime": _check_matches("ONNX Runtime", _run_onnx(onnx_path, x_test),
                                              eager_probs, eager_labels),
                "torchscript": _check_matches("TorchScript", _run_torchscript(pt_path, x_test),
                                              eager_probs, eager_labels),
            }  # fmt: skip
            config = digits_config()
            number = version if version is not None else next_version(model_dir)
            card = _model_card(
                number=number, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                test_accuracy=test_accuracy, train_time_s=train_time_s, final_loss=final_loss,
                train_size=len(y_train), test_size=len(y_test), params=parameter_count(net),
                onnx_path=onnx_path, pt_path=pt_path, config=config, max_diff=max_diff,
            )  # fmt: skip
            # The drift monitor's reference: the training inputs and the served (ONNX) model's
            # confidence on them. NOTE: a model is more confident on its training data than
            # on new data; the confidence bins are the reference's deciles, so that gap stays
            # well below the warning PSI (measured ~0.04 on the held-out split).
            card["reference_profile"] = write_reference_profile(
                staging,
                {INPUT_NAME: x_train},
                _run_onnx(onnx_path, x_train)[0],
                source=f"{MODEL_NAME} training split (seed {seed}, {len(x_train)} images); "
                f"confidence of {onnx_path.name}",
            )
            (staging / MODEL_CARD_FILENAME).write_text(json.dumps(card, indent=2) + "\n")
            version_dir = publish_version(staging, model_dir, number, config)

    logger.info(
        "published %s version %d at %s: test accuracy %.4f, %d epochs in %.2f s",
        MODEL_NAME, number, version_dir, test_accuracy, epochs, train_time_s,
    )  # fmt: skip
    return TrainResult(
        model_dir=model_dir,
        version=number,
        version_dir=version_dir,
        test_accuracy=test_accuracy,
        train_time_s=train_time_s,
        parameter_count=parameter_count(net),
        card=card,
    )


@contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seed torch and run on one thread with deterministic kernels; restore all on exit.

    NOTE: thread count and the deterministic flag are process-global in torch, so they are
    restored afterwards; `fork_rng` keeps the caller's global RNG stream untouched.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)


@contextmanager
def _quiet_torchscript_deprecations() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in TORCHSCRIPT_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        yield


def _fit(
    net: DigitsCNN,
    x_train: np.ndarray,
    y_train: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> float:
    """Train `net` in place with Adam and cross-entropy; return the last epoch's mean loss."""
    images, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    mean_loss = float("nan")
    net.train()
    bar = tqdm(
        range(epochs),
        desc=f"train {MODEL_NAME}",
        unit="epoch",
        file=sys.stderr,
        disable=not progress,
    )
    for _ in bar:
        order = torch.randperm(len(labels), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            logits = net(images[index])
            loss = loss_fn(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(index)
            correct += int((logits.detach().argmax(dim=1) == labels[index]).sum())
        mean_loss = total_loss / len(labels)
        bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{correct / len(labels):.4f}")
    bar.close()
    net.eval()
    return mean_loss


def _export(serving: DigitsServing, example: torch.Tensor, out_dir: Path) -> tuple[Path, Path]:
    """Write `model.onnx` and `model.pt` into `out_dir`; return their paths (onnx, pt)."""
    onnx_path = out_dir / ENGINE_FILENAMES["onnxruntime"]
    pt_path = out_dir / ENGINE_FILENAMES["torchscript"]
    with torch.no_grad(), _quiet_torchscript_deprecations():
        traced = torch.jit.trace(serving, example)  # type: ignore[no-untyped-call]
        traced.save(str(pt_path))
        names = (INPUT_NAME, PROBABILITIES_NAME, LABEL_NAME)
        torch.onnx.export(
            serving,
            (example,),
            str(onnx_path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[PROBABILITIES_NAME, LABEL_NAME],
            dynamic_axes={name: {0: "batch"} for name in names},
        )
    onnx.checker.check_model(str(onnx_path))
    return onnx_path, pt_path


def _run_onnx(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    probs, labels = session.run([PROBABILITIES_NAME, LABEL_NAME], {INPUT_NAME: images})
    return np.asarray(probs), np.asarray(labels)


def _run_torchscript(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with _quiet_torchscript_deprecations():
        module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        probs, labels = module.eval()(torch.from_numpy(images))
    return probs.numpy(), labels.numpy()


def _check_matches(
    what: str,
    outputs: tuple[np.ndarray, np.ndarray],
    eager_probs: np.ndarray,
    eager_labels: np.ndarray,
) -> float:
    """Check an exported model against the eager one; return the largest probability difference.

    Labels must agree except where the eager top-2 probabilities are within `EXPORT_ATOL`
    (a genuine tie that rounding may break either way).

    Raises:
        ExportMismatchError: shapes, dtypes, probabilities or labels disagree.
    """
    probs, labels = outputs
    if probs.shape != eager_probs.shape or labels.shape != eager_labels.shape:
        raise ExportMismatchError(
            f"{what} shapes {probs.shape}, {labels.shape} != eager "
            f"{eager_probs.shape}, {eager_labels.shape}"
        )
    if probs.dtype != np.float32 or labels.dtype != np.int64:
        raise ExportMismatchError(f"{what} dtypes {probs.dtype}, {labels.dtype} != float32, int64")
    max_diff = float(np.max(np.abs(probs - eager_probs)))
    if max_diff > EXPORT_ATOL:
        raise ExportMismatchError(f"{what} probabilities differ by up to {max_diff:.3g}")
    top2 = np.sort(eager_probs, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > EXPORT_ATOL
    if np.any((labels[:, 0] != eager_labels[:, 0]) & decisive):
        raise ExportMismatchError(f"{what} labels differ from the eager model's")
    return max_diff


def _model_card(
    *,
    number: int,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    test_accuracy: float,
    train_time_s: float,
    final_loss: float,
    train_size: int,
    test_size: int,
    params: int,
    onnx_path: Path,
    pt_path: Path,
    config: ModelConfig,
    max_diff: dict[str, float],
) -> dict[str, Any]:
    return {
        "name": MODEL_NAME,
        "version": number,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": ARCHITECTURE,
        "parameter_count": params,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": "Adam",
        "learning_rate": lr,
        "final_train_loss": final_loss,
        "train_time_s": round(train_time_s, 3),
        "test_accuracy": test_accuracy,
        "data": {
            "source": "sklearn.datasets.load_digits",
            "sha256": dataset_sha256(),
            "train_size": train_size,
            "test_size": test_size,
            "test_fraction": TEST_FRACTION,
            "split": "stratified, random_state=seed",
        },
        "preprocessing": f"none by the client: raw intensities 0..16, divided by {MAX_INTENSITY:g} "
        "inside the graph",
        "files": {
            onnx_path.name: {
                "sha256": file_sha256(onnx_path),
                "size_bytes": onnx_path.stat().st_size,
            },
            pt_path.name: {"sha256": file_sha256(pt_path), "size_bytes": pt_path.stat().st_size},
        },
        "onnx_sha256": file_sha256(onnx_path),
        "onnx_opset": ONNX_OPSET,
        "export_max_abs_diff": max_diff,
        "inputs": [t.model_dump() for t in config.inputs],
        "outputs": [t.model_dump() for t in config.outputs],
        "packages": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "sklearn": sklearn.__version__,
        },
    }
