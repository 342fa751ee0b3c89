"""`batchwire trace-report FILE`: where request time went, read back from exported spans.

Reads the JSON-lines span files of `--trace-file` (layout: `monitoring/spans.py`), joins
each request's server span with its `decode`, `queue` and `encode` children and with the
`engine` span of the batch that linked to it (or its own `engine` child on the CPU lane),
and reports per latency percentile band the mean of each component, the slowest requests
with their batch, and a stacked-bar PNG. "other" is what no child span covers: gRPC and
event-loop time, and waiting for the batch's result to be delivered.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from monitoring import spans as S

logger = logging.getLogger(__name__)

COMPONENTS: Final = ("decode", "queue", "compute", "encode", "other")
#: Band edges in percent of requests ranked by total latency.
BAND_EDGES: Final = (0.0, 50.0, 90.0, 99.0, 99.9, 100.0)


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """The batch a request ran in."""

    span_id: str
    size: int
    padded_size: int
    requests: int
    engine_ms: float


@dataclass(slots=True)
class Breakdown:
    """One request's time, by component (milliseconds)."""

    trace_id: str
    span_id: str
    model: str
    lane: str
    status: str
    total_ms: float
    decode_ms: float = 0.0
    queue_ms: float = 0.0
    compute_ms: float | None = None
    """None when the compute span is missing (e.g. its batch span was not exported)."""
    encode_ms: float = 0.0
    batch: BatchInfo | None = None

    @property
    def other_ms(self) -> float:
        """Total minus the components the child spans cover."""
        known = self.decode_ms + self.queue_ms + (self.compute_ms or 0.0) + self.encode_ms
        return max(self.total_ms - known, 0.0)

    def component(self, name: str) -> float:
        """One of COMPONENTS, in ms (a missing compute counts 0)."""
        if name == "other":
            return self.other_ms
        value: float | None = getattr(self, f"{name}_ms")
        return float(value or 0.0)


@dataclass(slots=True)
class Band:
    """Requests whose total latency ranks within [lo, hi) percent."""

    label: str
    count: int
    mean_total_ms: float
    mean_ms: dict[str, float] = field(default_factory=dict)


def load_spans(paths: Iterable[Path]) -> tuple[list[dict[str, Any]], int]:
    """Spans from JSON-lines files; returns them and the number of malformed lines skipped."""
    spans: list[dict[str, Any]] = []
    malformed = 0
    for path in paths:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    span = json.loads(line)
                    if not isinstance(span, dict) or not {"span_id", "name"} <= span.keys():
                        raise ValueError("not a span")
                    span["start_ns"], span["end_ns"] = int(span["start_ns"]), int(span["end_ns"])
                except (ValueError, KeyError, TypeError):
                    malformed += 1
                    continue
                spans.append(span)
    return spans, malformed


def _ms(span: dict[str, Any]) -> float:
    return (int(span["end_ns"]) - int(span["start_ns"])) / 1e6


def join(spans: Sequence[dict[str, Any]]) -> list[Breakdown]:
    """One breakdown per request server span (those carrying `batchwire.model.name`)."""
    children: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        parent = span.get("parent_span_id")
        if parent:
            children[parent].append(span)
    batch_of: dict[str, BatchInfo] = {}
    for span in spans:
        if span["name"] != S.BATCH:
            continue
        attrs = span.get("attributes", {})
        engine = next((c for c in children[span["span_id"]] if c["name"] == S.ENGINE), None)
        info = BatchInfo(
            span["span_id"],
            int(attrs.get(S.BATCH_SIZE, 0)),
            int(attrs.get(S.BATCH_PADDED_SIZE, attrs.get(S.BATCH_SIZE, 0))),
            int(attrs.get(S.BATCH_REQUESTS, len(span.get("links", [])))),
            _ms(engine) if engine is not None else _ms(span),
        )
        for link in span.get("links", []):
            batch_of[link["span_id"]] = info
    out = []
    for span in spans:
        attrs = span.get("attributes", {})
        if span.get("kind") != "SERVER" or S.MODEL_NAME not in attrs:
            continue
        kids = {c["name"]: c for c in children[span["span_id"]]}
        breakdown = Breakdown(
            trace_id=span.get("trace_id", ""),
            span_id=span["span_id"],
            model=str(attrs[S.MODEL_NAME]),
            lane=str(attrs.get(S.LANE, "")),
            status=str(attrs.get(S.RPC_RESPONSE_STATUS_CODE, "")),
            total_ms=_ms(span),
        )
        if S.DECODE in kids:
            breakdown.decode_ms = _ms(kids[S.DECODE])
        if S.QUEUE in kids:
            breakdown.queue_ms = _ms(kids[S.QUEUE])
        if S.ENCODE in kids:
            breakdown.encode_ms = _ms(kids[S.ENCODE])
        if S.ENGINE in kids:  # the CPU lane
            breakdown.compute_ms = _ms(kids[S.ENGINE])
        elif span["span_id"] in batch_of:
            batch = batch_of[span["span_id"]]
            breakdown.batch = batch
            breakdown.compute_ms = batch.engine_ms
        out.append(breakdown)
    return out


def bands(requests: Sequence[Breakdown]) -> list[Band]:
    """Mean components per percentile band of total latency (empty bands left out)."""
    ranked = sorted(requests, key=lambda r: r.total_ms)
    n = len(ranked)
    out = []
    for lo, hi in zip(BAND_EDGES, BAND_EDGES[1:], strict=False):
        first, last = math.ceil(n * lo / 100), math.ceil(n * hi / 100)
        members = ranked[first:last]
        if not members:
            continue
        band = Band(
            f"p{lo:g}-p{hi:g}", len(members), sum(r.total_ms for r in members) / len(members)
        )
        for name in COMPONENTS:
            band.mean_ms[name] = sum(r.component(name) for r in members) / len(members)
        out.append(band)
    return out


def build_report(
    spans: Sequence[dict[str, Any]], *, model: str | None = None, top: int = 10, malformed: int = 0
) -> dict[str, Any]:
    """The whole report as a JSON-able dict: per model, its bands and slowest requests."""
    requests = [r for r in join(spans) if model is None or r.model == model]
    by_model: dict[str, list[Breakdown]] = defaultdict(list)
    for request in requests:
        by_model[request.model].append(request)
    models = {}
    for name, members in sorted(by_model.items()):
        slowest = sorted(members, key=lambda r: r.total_ms, reverse=True)[:top]
        models[name] = {
            "requests": len(members),
            "missing_compute": sum(r.compute_ms is None and r.status == "OK" for r in members),
            "bands": [asdict(b) for b in bands(members)],
            "slowest": [{**asdict(r), "other_ms": r.other_ms} for r in slowest],
        }
    return {"spans": len(spans), "malformed_lines": malformed, "models": models}


def _share(part: float, total: float) -> float:
    return part / total * 100 if total else 0.0


def render(report: dict[str, Any]) -> str:
    """The report as text tables."""
    lines = [f"{report['spans']} spans read ({report['malformed_lines']} malformed lines skipped)"]
    if not report["models"]:
        lines.append("no request spans found (was tracing on? `serve --trace-sampling 1`)")
    for model, data in report["models"].items():
        lines.append("")
        lines.append(f"model {model}: {data['requests']} requests")
        if data["missing_compute"]:
            lines.append(
                f"  ({data['missing_compute']} without a compute span: batch not exported)"
            )
        header = f"  {'band':<12} {'n':>6} {'total ms':>9}" + "".join(
            f" {c + ' ms':>10}" for c in COMPONENTS
        )
        lines.append(header)
        for band in data["bands"]:
            total = band["mean_total_ms"]
            cells = "".join(
                f" {band['mean_ms'][c]:>6.3f}{_share(band['mean_ms'][c], total):>3.0f}%"
                for c in COMPONENTS
            )
            lines.append(f"  {band['label']:<12} {band['count']:>6} {total:>9.3f}{cells}")
        lines.append("  slowest requests:")
        for r in data["slowest"]:
            batch = r["batch"]
            where = (
                f"batch {batch['span_id']} ({batch['requests']} requests, {batch['size']} samples"
                f", padded {batch['padded_size']}, engine {batch['engine_ms']:.3f} ms)"
                if batch
                else f"lane {r['lane'] or '-'}"
            )
            compute = "-" if r["compute_ms"] is None else f"{r['compute_ms']:.3f}"
            lines.append(
                f"    {r['trace_id']} {r['status']:<17} total {r['total_ms']:.3f} ms = decode "
                f"{r['decode_ms']:.3f} + queue {r['queue_ms']:.3f} + compute {compute} + encode "
                f"{r['encode_ms']:.3f} + other {r['other_ms']:.3f}; {where}"
            )
    return "\n".join(lines) + "\n"


def write_png(report: dict[str, Any], path: Path) -> None:
    """A stacked bar per band (one panel per model) of the mean components.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"].items())
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(6 * max(len(models), 1), 4.5))
    axes_list = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, (model, data) in zip(axes_list, models, strict=False):
        labels = [b["label"] for b in data["bands"]]
        bottom = [0.0] * len(labels)
        for component in COMPONENTS:
            values = [b["mean_ms"][component] for b in data["bands"]]
            ax.bar(labels, values, bottom=bottom, label=component)
            bottom = [a + b for a, b in zip(bottom, values, strict=True)]
        ax.set_title(f"{model}: mean latency by component")
        ax.set_ylabel("ms")
        ax.set_xlabel("requests ranked by total latency")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    paths: list[Path] = []
    for pattern in args.files:
        matched = sorted(glob.glob(pattern)) or [pattern]
        paths.extend(Path(p) for p in matched)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"batchwire trace-report: no such file: {missing[0]}", file=sys.stderr)
        return 1
    spans, malformed = load_spans(paths)
    report = build_report(spans, model=args.model, top=args.top, malformed=malformed)
    sys.stdout.write(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if not args.no_png and report["models"]:
        png = args.png or paths[0].with_name(paths[0].name + ".png")
        try:
            write_png(report, png)
            print(f"wrote {png}")
        except ImportError:
            print("the PNG needs matplotlib: pip install 'batchwire[loadtest]'", file=sys.stderr)
    return 0


def add_trace_report_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Register `batchwire trace-report`."""
    parser = subparsers.add_parser(
        "trace-report", help="where request time went, from exported spans (JSON lines)"
    )
    parser.add_argument("files", nargs="+", help="span files or globs (serve --trace-file)")
    parser.add_argument("--model", default=None, help="only this model")
    parser.add_argument("--top", type=int, default=10, help="slowest requests to list")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--png", type=Path, default=None, help="plot path (default FILE.png)")
    parser.add_argument("--no-png", action="store_true", help="no plot")
    parser.set_defaults(func=_run)
