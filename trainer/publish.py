"""Publishing a model version atomically into the model repository (shared by every model)."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from batchwire.config import CONFIG_FILENAME, ModelConfig, version_dirs, write_model_config


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def next_version(model_dir: Path) -> int:
    """1 + the highest numbered version folder of a model (1 for a new model)."""
    return max(version_dirs(model_dir), default=0) + 1 if model_dir.is_dir() else 1


@contextmanager
def staging_dir(model_dir: Path) -> Iterator[Path]:
    """A hidden folder inside `model_dir` to assemble a version in; removed on failure."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".staging-{os.getpid()}-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_version(staging: Path, model_dir: Path, number: int, config: ModelConfig) -> Path:
    """Atomically replace `config.yaml`, then rename `staging` to `<model_dir>/<number>`."""
    final = model_dir / str(number)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    # NOTE: written inside the staging folder and renamed so readers see the old or new file whole.
    staged_config = write_model_config(staging, config)
    os.replace(staged_config, model_dir / CONFIG_FILENAME)
    # NOTE: rename is atomic on one file system; the version appears complete or not at all.
    os.rename(staging, final)
    return final
