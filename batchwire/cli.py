"""`batchwire` command line: `train`/`import` models into the repository, `serve` it."""

from __future__ import annotations

import argparse
import asyncio
import logging


def _serve(args: argparse.Namespace) -> int:
    from server.app import ServeSettings, serve

    settings = ServeSettings(
        model_repository=args.model_repository,
        host=args.host,
        port=args.port,
        intra_op_threads=args.intra_op_threads,
        max_message_bytes=args.max_message_bytes,
        shutdown_grace_s=args.shutdown_grace_s,
        reuse_port=args.reuse_port,
    )
    if args.workers > 1:
        from server.workers import serve_workers

        return serve_workers(settings, args.workers, args.log_level)
    return asyncio.run(serve(settings))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `batchwire` command."""
    from trainer.cli import (
        add_build_engine_parser,
        add_import_parser,
        add_repository_argument,
        add_train_parser,
    )

    parser = argparse.ArgumentParser(prog="batchwire", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve every model in a model repository over gRPC")
    add_repository_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8001, help="gRPC port (0 = any free port)")
    serve.add_argument(
        "--intra-op-threads",
        type=int,
        default=None,
        help="override every model's intra-op threads per engine instance (default: config)",
    )
    serve.add_argument(
        "--max-message-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="largest request/response message; larger get RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=30.0,
        help="on SIGTERM, how long in-flight requests may take to finish",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port via SO_REUSEPORT, each with its own runtime",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT (set on each --workers process; rarely needed by hand)",
    )
    serve.set_defaults(func=_serve)

    add_train_parser(sub)
    add_import_parser(sub)
    add_build_engine_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `batchwire` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
