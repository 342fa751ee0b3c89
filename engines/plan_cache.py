"""TensorRT plan cache: a plan is reused only for the exact model, TensorRT, GPU and flags."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

#: Folder of a version that holds its plans, their sidecars and the timing cache.
PLANS_DIRNAME: Final = "plans"
#: TensorRT's timing cache (tactic timings), shared by every build of a version.
TIMING_CACHE_FILENAME: Final = "timing.cache"
#: Hex digits of the key's sha256 that name a plan file (the sidecar holds the full key).
SHORT_HASH_CHARS: Final = 16

#: One input's optimisation profile: name, min, opt and max shapes (batch axis included).
ProfileEntry = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class PlanKey:
    """Everything a TensorRT plan depends on: a plan built for another key must not load.

    A plan is specific to the exact ONNX bytes, the TensorRT version that built it (plans
    are not portable across versions), the GPU model (tactics are timed on it), the
    precision asked for and the optimisation profile (shapes the plan accepts).

    Attributes:
        onnx_sha256: hex sha256 of `model.onnx`.
        trt_version: `tensorrt.__version__` of the builder.
        gpu_name: the device name and compute capability, e.g. "NVIDIA H100 (sm_90)".
        precision: the precision asked for ("fp32" or "fp16").
        profile: one `ProfileEntry` per input, in declared input order.
    """

    onnx_sha256: str
    trt_version: str
    gpu_name: str
    precision: str
    profile: tuple[ProfileEntry, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for shapes), the form kept in the sidecar."""
        return {
            "onnx_sha256": self.onnx_sha256,
            "trt_version": self.trt_version,
            "gpu_name": self.gpu_name,
            "precision": self.precision,
            "profile": [
                {"name": name, "min": list(lo), "opt": list(opt), "max": list(hi)}
                for name, lo, opt, hi in self.profile
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlanKey:
        """The inverse of `to_json`.

        Raises:
            KeyError, TypeError, ValueError: `data` is not a key's JSON form.
        """
        profile = tuple(
            (str(p["name"]), _ints(p["min"]), _ints(p["opt"]), _ints(p["max"]))
            for p in data["profile"]
        )
        return cls(
            onnx_sha256=str(data["onnx_sha256"]),
            trt_version=str(data["trt_version"]),
            gpu_name=str(data["gpu_name"]),
            precision=str(data["precision"]),
            profile=profile,
        )

    def digest(self) -> str:
        """Short hex hash of the canonical JSON form: the plan's file name."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:SHORT_HASH_CHARS]


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def plans_dir(version_dir: Path) -> Path:
    """`<version_dir>/plans/`."""
    return Path(version_dir) / PLANS_DIRNAME


def plan_path(version_dir: Path, key: PlanKey) -> Path:
    """Where the plan of `key` lives: `<version_dir>/plans/<short hash of key>.plan`."""
    return plans_dir(version_dir) / f"{key.digest()}.plan"


def sidecar_path(version_dir: Path, key: PlanKey) -> Path:
    """The JSON sidecar beside the plan of `key`, holding the full key."""
    return plan_path(version_dir, key).with_suffix(".json")


def timing_cache_path(version_dir: Path) -> Path:
    """`<version_dir>/plans/timing.cache`."""
    return plans_dir(version_dir) / TIMING_CACHE_FILENAME


def find_plan(version_dir: Path, key: PlanKey) -> Path | None:
    """The cached plan built for exactly `key`, or None when it must be (re)built.

    A plan counts only when its sidecar exists, parses and holds a key equal to `key` in
    every field: another ONNX hash, TensorRT version, GPU, precision or profile means a
    rebuild, never a stale plan (and a hash collision of the file name is caught too).
    """
    plan = plan_path(version_dir, key)
    sidecar = sidecar_path(version_dir, key)
    if not plan.is_file() or not sidecar.is_file():
        return None
    try:
        stored = PlanKey.from_json(json.loads(sidecar.read_text())["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring plan %s: unreadable sidecar %s (%s)", plan, sidecar, exc)
        return None
    if stored != key:
        differs = [
            field
            for field in ("onnx_sha256", "trt_version", "gpu_name", "precision", "profile")
            if getattr(stored, field) != getattr(key, field)
        ]
        logger.info("ignoring plan %s: built for another %s", plan, ", ".join(differs))
        return None
    return plan


def publish_plan(
    version_dir: Path, key: PlanKey, staged_plan: Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Move a built (and validated) plan into the cache under `key`; return its path.

    NOTE: the old sidecar goes first and the new one is written last, each file replaced
    atomically, so `find_plan` never pairs a sidecar with a plan it does not describe.

    Args:
        version_dir: the version folder the plan belongs to.
        key: what the plan was built for.
        staged_plan: the plan file, on the same file system (e.g. in `plans/`).
        metadata: extra facts for the sidecar (effective precision, errors, build time).
    """
    final = plan_path(version_dir, key)
    sidecar = sidecar_path(version_dir, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    sidecar.unlink(missing_ok=True)
    os.replace(staged_plan, final)
    document = {"key": key.to_json(), **(metadata or {})}
    atomic_write_bytes(sidecar, json.dumps(document, indent=2, sort_keys=True).encode())
    return final


def remove_plan(version_dir: Path, key: PlanKey) -> None:
    """Delete the plan of `key` and its sidecar (sidecar first), if present."""
    sidecar_path(version_dir, key).unlink(missing_ok=True)
    plan_path(version_dir, key).unlink(missing_ok=True)


def staging_path(version_dir: Path) -> Path:
    """A fresh hidden file name in `plans/` to write a plan to before it is published."""
    directory = plans_dir(version_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f".staging-{os.getpid()}-{uuid.uuid4().hex}.plan"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, remembered per (path, size, mtime) within a process.

    Every engine instance of every served version looks its plan up by the ONNX hash;
    large models (MiniLM: 90 MB) are hashed once, not once per instance.
    """
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size_bytes: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
