"""`batchwire` command line: `train`/`import` models into the repository, `serve` it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monitoring.hub import MonitoringSettings

#: Triton's gRPC and metrics ports.
DEFAULT_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_TRACE_FILE = Path("traces/batchwire-spans.jsonl")


def monitoring_settings(args: argparse.Namespace) -> MonitoringSettings | None:
    """The monitoring part of `serve`'s flags (None = `--no-monitoring`)."""
    if args.no_monitoring:
        return None
    from monitoring.hub import MonitoringSettings
    from monitoring.tracing import TracingSettings

    endpoint = args.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ratio = args.trace_sampling
    if ratio is None:
        ratio = 1.0 if endpoint else 0.0
    tracing = (
        TracingSettings(
            sampling_ratio=ratio,
            otlp_endpoint=endpoint,
            trace_file=args.trace_file,
            shipper=args.trace_shipper,
        )  # fmt: skip
        if ratio > 0
        else None
    )
    return MonitoringSettings(
        metrics_host=args.metrics_host or args.host,
        metrics_port=None if args.no_metrics else args.metrics_port,
        tracing=tracing,
    )


def _serve(args: argparse.Namespace) -> int:
    from server.app import ServeSettings, serve

    if args.ray:
        from server.ray_serve import DEFAULT_GRPC_PORT, RayServeSettings, serve_ray

        return serve_ray(
            RayServeSettings(
                model_repository=args.model_repository,
                host=args.host,
                port=args.port if args.port is not None else DEFAULT_GRPC_PORT,
                http_port=args.ray_http_port,
                intra_op_threads=args.intra_op_threads,
                num_cpus=args.ray_num_cpus,
            )
        )
    if args.trace_sampling is not None and not 0.0 <= args.trace_sampling <= 1.0:
        raise SystemExit(f"--trace-sampling {args.trace_sampling} is outside 0..1")
    settings = ServeSettings(
        model_repository=args.model_repository,
        host=args.host,
        port=args.port if args.port is not None else DEFAULT_PORT,
        intra_op_threads=args.intra_op_threads,
        max_message_bytes=args.max_message_bytes,
        shutdown_grace_s=args.shutdown_grace_s,
        reuse_port=args.reuse_port,
        monitoring=monitoring_settings(args),
    )
    if args.workers > 1:
        from server.workers import serve_workers

        return serve_workers(settings, args.workers, args.log_level, _monitoring_argv(args))
    return asyncio.run(serve(settings))


def _ray_config(args: argparse.Namespace) -> int:
    from server.ray_serve import write_serve_config

    write_serve_config(
        args.out, args.model_repository, args.port, args.intra_op_threads, args.ingress_replicas
    )
    print(f"wrote {args.out}: serve deploy {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `batchwire` command."""
    from monitoring.slo_cli import add_slo_parser
    from monitoring.trace_report import add_trace_report_parser
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
    serve.add_argument(
        "--port",
        type=int,
        default=None,
        help="gRPC port (default 8001; 9000 with --ray; 0 = any free port, plain server only)",
    )
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
    ray_group = serve.add_argument_group("Ray Serve (see README: Ray Serve)")
    ray_group.add_argument(
        "--ray",
        action="store_true",
        help="start a local Ray instance and serve through Ray Serve's gRPC proxy",
    )
    ray_group.add_argument(
        "--ray-http-port", type=int, default=8000, help="Serve's HTTP proxy port (default 8000)"
    )
    ray_group.add_argument(
        "--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)"
    )
    _add_monitoring_arguments(serve)
    serve.set_defaults(func=_serve)

    ray_config = sub.add_parser(
        "ray-config", help="write a Ray Serve config file (for `serve deploy` or KubeRay)"
    )
    ray_config.add_argument(
        "--model-repository",
        default="/models",
        help="the repository path as the Ray cluster sees it (default /models)",
    )
    ray_config.add_argument("--port", type=int, default=9000, help="gRPC port (default 9000)")
    ray_config.add_argument("--intra-op-threads", type=int, default=None)
    ray_config.add_argument(
        "--ingress-replicas",
        type=int,
        default=1,
        help="replicas of the ingress deployment every request crosses (default 1)",
    )
    ray_config.add_argument("--out", type=Path, default=Path("serve_config.yaml"))
    ray_config.set_defaults(func=_ray_config)

    add_train_parser(sub)
    add_import_parser(sub)
    add_build_engine_parser(sub)
    add_slo_parser(sub)
    add_trace_report_parser(sub)
    return parser


def _add_monitoring_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("monitoring (metrics, SLOs, drift, traces)")
    group.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="HTTP port of /metrics (Prometheus), /slo and /drift (default 8002; 0 = any free "
        "port; with --workers N, worker i uses PORT+i)",
    )
    group.add_argument(
        "--metrics-host", default=None, help="address of the metrics endpoint (default: --host)"
    )
    group.add_argument(
        "--no-metrics",
        action="store_true",
        help="no metrics endpoint (SLO and drift alerts are still evaluated and logged)",
    )
    group.add_argument(
        "--no-monitoring",
        action="store_true",
        help="no metrics endpoint, SLO, drift or tracing (ModelStatistics still counts)",
    )
    group.add_argument(
        "--trace-sampling",
        type=float,
        default=None,
        help="share of requests whose traces are exported, 0..1 (default 0 = tracing off; "
        "1.0 when an OTLP endpoint is set)",
    )
    group.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export spans over OTLP/gRPC to this collector (default: "
        "$OTEL_EXPORTER_OTLP_ENDPOINT; unset = the JSON-lines --trace-file)",
    )
    group.add_argument(
        "--trace-file",
        type=Path,
        default=DEFAULT_TRACE_FILE,
        help=f"JSON-lines span file when no OTLP endpoint is set (default {DEFAULT_TRACE_FILE})",
    )
    from monitoring.ship_process import SHIPPERS

    group.add_argument(
        "--trace-shipper",
        choices=SHIPPERS,  # (a light import: no numpy)
        default="process",
        help="where spans are encoded and exported: a child process at the lowest CPU "
        "priority (default; the event loop's GIL is not held for it) or a thread of the "
        "server",
    )


def _monitoring_argv(args: argparse.Namespace) -> list[list[str]]:
    """Per worker (`--workers N`): the monitoring flags it gets. Worker i's metrics port is
    PORT+i (or 0) and its trace file gets a `.w<i>` suffix, so workers never collide."""
    out = []
    for i in range(args.workers):
        argv: list[str] = []
        if args.no_monitoring:
            argv.append("--no-monitoring")
        if args.no_metrics:
            argv.append("--no-metrics")
        port = args.metrics_port + i if args.metrics_port else 0
        argv += ["--metrics-port", str(port)]
        if args.metrics_host:
            argv += ["--metrics-host", args.metrics_host]
        if args.trace_sampling is not None:
            argv += ["--trace-sampling", str(args.trace_sampling)]
        if args.otlp_endpoint:
            argv += ["--otlp-endpoint", args.otlp_endpoint]
        argv += ["--trace-shipper", args.trace_shipper]
        trace_file: Path = args.trace_file
        argv += ["--trace-file", str(trace_file.with_name(f"{trace_file.name}.w{i}"))]
        out.append(argv)
    return out


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
