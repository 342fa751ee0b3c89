"""`batchwire trace-report FILE`: where request time went, read back from exported spans.

Reads the JSON-lines span files of `serve --trace-file` (layout: `monitoring/spans.py`),
joins each request's server span with its `decode`, `queue` and `encode` children and with
the `engine` span of the batch that linked to it (or its own `engine` child on the CPU
lane), and reports, per band of requests ranked by total latency, the mean of each
component; the slowest requests with their batch; and a stacked-bar PNG.

Components of one request (milliseconds):

- decode, queue, encode: its child spans (0 when absent: no queue on the CPU lane).
- compute: the engine call of its batch, or of its CPU-lane run. A request that ended
  without reaching an engine (rejected, timed out in the queue) has compute 0.
- other: total minus the above: gRPC and event-loop time, batch assembly, and waiting for
  the event loop to pick up the batch's result (and the queue wait of a request dropped
  from the queue past its deadline: the tracer records no `queue` span for those).
- unattributed: for a successful request whose compute span is missing (its batch span was
  not exported, or lies in a file not given), compute and other cannot be told apart; their
  sum goes here, so a band's components still add up to its mean total.

Pure functions (`load_spans` -> `join` -> `bands` -> `build_report` -> `render`) so tests
feed synthetic spans; every join is a dict lookup keyed by (trace id, span id), so the cost
is linear: about 2 CPU-seconds per 100k spans, most of it JSON parsing.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from monitoring import spans as S

logger = logging.getLogger(__name__)

COMPONENTS: Final = ("decode", "queue", "compute", "encode", "other", "unattributed")
#: Band edges in percent of requests ranked by total latency.
BAND_EDGES: Final = (0.0, 50.0, 90.0, 99.0, 99.9, 100.0)
#: Statuses of requests that must have run on an engine (a missing compute span is a gap).
_COMPUTED_STATUSES: Final = frozenset({"OK", ""})
_PNG_HINT: Final = "the PNG needs matplotlib: pip install 'batchwire[loadtest]'"

SpanKey = tuple[str, str]
"""(trace id, span id): span ids are only unique within a trace."""


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """The batch a request ran in (from its `batch` span)."""

    span_id: str
    size: int
    """Samples in the batch."""
    padded_size: int
    """Samples the engine ran (after bucket padding)."""
    requests: int
    """Requests in the batch (traced or not)."""
    engine_ms: float
    status: str
    """The batch span's status (`ERROR` when the engine failed)."""


@dataclass(slots=True)
class Breakdown:
    """One request's time, by component (milliseconds)."""

    trace_id: str
    span_id: str
    model: str
    lane: str
    status: str
    """gRPC status name (`rpc.response.status_code`; "" when the span has none)."""
    total_ms: float
    decode_ms: float = 0.0
    queue_ms: float = 0.0
    compute_ms: float | None = 0.0
    """None when the request succeeded but no engine span joins it (see `unattributed_ms`)."""
    encode_ms: float = 0.0
    batch: BatchInfo | None = None

    @property
    def other_ms(self) -> float:
        """Total minus decode, queue, compute and encode (0 while compute is unknown)."""
        if self.compute_ms is None:
            return 0.0
        return max(self.total_ms - self._known_ms() - self.compute_ms, 0.0)

    @property
    def unattributed_ms(self) -> float:
        """compute + other of a request whose compute span is missing (else 0)."""
        if self.compute_ms is not None:
            return 0.0
        return max(self.total_ms - self._known_ms(), 0.0)

    def _known_ms(self) -> float:
        return self.decode_ms + self.queue_ms + self.encode_ms

    def component(self, name: str) -> float:
        """One of COMPONENTS, in ms."""
        if name == "other":
            return self.other_ms
        if name == "unattributed":
            return self.unattributed_ms
        value: float | None = getattr(self, f"{name}_ms")
        return 0.0 if value is None else value

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with the derived components."""
        return {**asdict(self), "other_ms": self.other_ms, "unattributed_ms": self.unattributed_ms}


@dataclass(slots=True)
class Band:
    """Requests whose total latency ranks within [lo, hi) percent."""

    label: str
    count: int
    mean_total_ms: float
    max_total_ms: float
    missing_compute: int
    """Members whose compute span is missing (their compute + other is `unattributed`)."""
    mean_ms: dict[str, float] = field(default_factory=dict)
    """Mean of each of COMPONENTS over all members; they add up to `mean_total_ms`."""


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Files named by paths or globs (e.g. `'traces/*.jsonl*'` for `--workers` files).

    A glob skips `.png` and `.json` files, so the report's own outputs next to the span
    files are not read back as spans; a pattern that matches nothing is kept as a path.
    """
    paths: list[Path] = []
    for pattern in patterns:
        matched = [p for p in sorted(glob.glob(pattern)) if not p.endswith((".png", ".json"))] or [
            pattern
        ]
        paths.extend(Path(p) for p in matched if Path(p) not in paths)
    return paths


def load_spans(paths: Iterable[Path]) -> tuple[list[dict[str, Any]], int]:
    """Spans from JSON-lines files.

    Args:
        paths: the files, read in order.

    Returns:
        The spans (dicts in the exporter's layout, `start_ns`/`end_ns` as ints) and the
        number of malformed lines skipped (not JSON, not an object, or without `span_id`,
        `name`, `start_ns`, `end_ns`). Blank lines are neither.
    """
    spans: list[dict[str, Any]] = []
    malformed = 0
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    span = json.loads(line)
                    if not isinstance(span, dict):
                        raise TypeError("not an object")
                    span["span_id"] = str(span["span_id"])
                    span["name"] = str(span["name"])
                    span["start_ns"] = int(span["start_ns"])
                    span["end_ns"] = int(span["end_ns"])
                    span.pop("resource", None)  # unused; the largest field of some lines
                except (ValueError, KeyError, TypeError):
                    malformed += 1
                    continue
                spans.append(span)
    if malformed:
        logger.warning("skipped %d malformed lines", malformed)
    return spans, malformed


def _ms(span: dict[str, Any]) -> float:
    return (int(span["end_ns"]) - int(span["start_ns"])) / 1e6


def _attributes(span: dict[str, Any]) -> dict[str, Any]:
    attributes = span.get("attributes")
    return attributes if isinstance(attributes, dict) else {}


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def join(spans: Sequence[dict[str, Any]]) -> list[Breakdown]:
    """One breakdown per request: per server span that carries `batchwire.model.name`.

    Linear in the number of spans: children are indexed by (trace id, parent id) and
    batches by the (trace id, span id) of each server span they link to.
    """
    children: dict[SpanKey, dict[str, dict[str, Any]]] = defaultdict(dict)
    for span in spans:
        parent = span.get("parent_span_id")
        if parent:
            # One child of each name per parent; the first exported wins.
            children[(span.get("trace_id", ""), parent)].setdefault(span["name"], span)
    batch_of: dict[SpanKey, BatchInfo] = {}
    for span in spans:
        if span["name"] != S.BATCH:
            continue
        attrs = _attributes(span)
        links = span.get("links") or []
        engine = children.get((span.get("trace_id", ""), span["span_id"]), {}).get(S.ENGINE)
        size = _int(attrs.get(S.BATCH_SIZE), 0)
        info = BatchInfo(
            span_id=span["span_id"],
            size=size,
            padded_size=_int(attrs.get(S.BATCH_PADDED_SIZE), size),
            requests=_int(attrs.get(S.BATCH_REQUESTS), len(links)),
            engine_ms=_ms(engine if engine is not None else span),
            status=str(span.get("status", "")),
        )
        for link in links:
            if isinstance(link, dict) and "span_id" in link:
                batch_of[(str(link.get("trace_id", "")), str(link["span_id"]))] = info
    out = []
    for span in spans:
        attrs = _attributes(span)
        if span.get("kind") != "SERVER" or S.MODEL_NAME not in attrs:
            continue
        key = (span.get("trace_id", ""), span["span_id"])
        kids = children.get(key, {})
        status = str(attrs.get(S.RPC_RESPONSE_STATUS_CODE, ""))
        breakdown = Breakdown(
            trace_id=key[0],
            span_id=key[1],
            model=str(attrs[S.MODEL_NAME]),
            lane=str(attrs.get(S.LANE, "")),
            status=status,
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
        elif key in batch_of:
            breakdown.batch = batch_of[key]
            breakdown.compute_ms = breakdown.batch.engine_ms
        elif status in _COMPUTED_STATUSES:
            breakdown.compute_ms = None
        out.append(breakdown)
    return out


def bands(requests: Sequence[Breakdown]) -> list[Band]:
    """Mean components per percentile band of total latency (empty bands left out).

    A request of rank r (0-based, ascending total) out of n belongs to the band [lo, hi)
    with ceil(n * lo / 100) <= r < ceil(n * hi / 100).
    """
    ranked = sorted(requests, key=lambda r: r.total_ms)
    n = len(ranked)
    out = []
    for lo, hi in zip(BAND_EDGES, BAND_EDGES[1:], strict=False):
        members = ranked[math.ceil(n * lo / 100) : math.ceil(n * hi / 100)]
        if not members:
            continue
        count = len(members)
        band = Band(
            label=f"p{lo:g}-p{hi:g}",
            count=count,
            mean_total_ms=sum(r.total_ms for r in members) / count,
            max_total_ms=members[-1].total_ms,
            missing_compute=sum(r.compute_ms is None for r in members),
        )
        for name in COMPONENTS:
            band.mean_ms[name] = sum(r.component(name) for r in members) / count
        out.append(band)
    return out


def _group(requests: Sequence[Breakdown], top: int) -> dict[str, Any]:
    slowest = sorted(requests, key=lambda r: r.total_ms, reverse=True)[:top]
    return {
        "requests": len(requests),
        "by_status": dict(Counter(r.status or "-" for r in requests).most_common()),
        "by_lane": dict(Counter(r.lane or "-" for r in requests).most_common()),
        "missing_compute": sum(r.compute_ms is None for r in requests),
        "bands": [asdict(b) for b in bands(requests)],
        "slowest": [r.to_dict() for r in slowest],
    }


def build_report(
    spans: Sequence[dict[str, Any]],
    *,
    model: str | None = None,
    top: int = 10,
    malformed: int = 0,
    files: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole report as a JSON-able dict.

    Args:
        spans: loaded spans (`load_spans`).
        model: only this model's requests (None = all).
        top: how many of the slowest requests to list per group.
        malformed: malformed lines skipped while loading (reported as is).
        files: the files read (reported as is).

    Returns:
        `{"files", "spans", "malformed_lines", "requests", "models": {name: group},
        "all": group | None}`; a group holds `requests`, `by_status`, `by_lane`,
        `missing_compute`, `bands` (`Band` fields) and `slowest` (`Breakdown` fields plus
        `other_ms` and `unattributed_ms`). `all` pools every model and is set only when
        several models appear.
    """
    requests = [r for r in join(spans) if model is None or r.model == model]
    by_model: dict[str, list[Breakdown]] = defaultdict(list)
    for request in requests:
        by_model[request.model].append(request)
    return {
        "files": list(files),
        "spans": len(spans),
        "malformed_lines": malformed,
        "requests": len(requests),
        "models": {name: _group(members, top) for name, members in sorted(by_model.items())},
        "all": _group(requests, top) if len(by_model) > 1 else None,
    }


def _share(part: float, total: float) -> float:
    return part / total * 100 if total else 0.0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def _render_group(title: str, data: dict[str, Any], with_model: bool) -> list[str]:
    lines = [
        "",
        f"{title}: {data['requests']} requests (status: {_counts(data['by_status'])}; "
        f"lane: {_counts(data['by_lane'])})",
    ]
    columns = [c for c in COMPONENTS if c != "unattributed" or data["missing_compute"]]
    if data["missing_compute"]:
        lines.append(
            f"  {data['missing_compute']} successful requests have no compute span (batch span "
            "not exported or in another file): their compute + other is 'unattributed'"
        )
    lines.append(
        f"  {'band':<11} {'n':>7} {'mean ms':>9} {'max ms':>9} "
        + "".join(f" {c:>13}" for c in columns)
        + "  (mean ms, share of mean)"
    )
    for band in data["bands"]:
        total = band["mean_total_ms"]
        cells = "".join(
            f" {band['mean_ms'][c]:>8.3f}{_share(band['mean_ms'][c], total):>4.0f}%"
            for c in columns
        )
        lines.append(
            f"  {band['label']:<11} {band['count']:>7} {total:>9.3f} {band['max_total_ms']:>9.3f} "
            f"{cells}"
        )
    if data["slowest"]:
        lines.append(f"  slowest {len(data['slowest'])}:")
    for r in data["slowest"]:
        compute = "?" if r["compute_ms"] is None else f"{r['compute_ms']:.3f}"
        parts = (
            f"decode {r['decode_ms']:.3f} + queue {r['queue_ms']:.3f} + compute {compute}"
            f" + encode {r['encode_ms']:.3f} + "
            + (
                f"unattributed {r['unattributed_ms']:.3f}"
                if r["compute_ms"] is None
                else f"other {r['other_ms']:.3f}"
            )
        )
        batch = r["batch"]
        where = (
            f"batch {batch['span_id']}: {batch['requests']} req, {batch['size']} samples "
            f"(padded {batch['padded_size']}), engine {batch['engine_ms']:.3f} ms"
            + (f", {batch['status']}" if batch["status"] == "ERROR" else "")
            if batch
            else "no batch"
        )
        model = f" {r['model']}" if with_model else ""
        lines.append(
            f"    {r['trace_id']}{model} {r['status'] or '-'} {r['lane'] or '-'}: "
            f"{r['total_ms']:.3f} ms = {parts}; {where}"
        )
    return lines


def render(report: dict[str, Any]) -> str:
    """The report as text tables (one per model, plus all models pooled when several)."""
    files = f" from {len(report['files'])} file(s)" if report["files"] else ""
    lines = [
        f"{report['spans']} spans{files} ({report['malformed_lines']} malformed lines "
        f"skipped), {report['requests']} requests; bands rank requests by total latency"
    ]
    if not report["models"]:
        lines.append("no request server spans found (was tracing on? `serve --trace-sampling 1`)")
    for model, data in report["models"].items():
        lines.extend(_render_group(f"model {model}", data, with_model=False))
    if report["all"] is not None:
        lines.extend(_render_group("all models", report["all"], with_model=True))
    return "\n".join(lines) + "\n"


def write_png(report: dict[str, Any], path: Path) -> None:
    """A stacked bar per band of the mean components: one panel per model (plus all
    models pooled when several).

    Raises:
        ImportError: matplotlib is not installed (it comes with the `loadtest` extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(f"model {m}", d) for m, d in report["models"].items()]
    if report["all"] is not None:
        groups.append(("all models", report["all"]))
    panels = max(len(groups), 1)
    fig, axes = plt.subplots(2, panels, figsize=(5.5 * panels, 8), squeeze=False)
    for column, (title, data) in enumerate(groups):
        labels = [f"{b['label']}\nn={b['count']}" for b in data["bands"]]
        # Top: mean ms (the tail's scale); bottom: shares, so the fast bands stay readable.
        for row, ax in enumerate(axes[:, column]):
            bottom = [0.0] * len(labels)
            for component in COMPONENTS:
                values = [b["mean_ms"][component] for b in data["bands"]]
                if not any(values):
                    continue
                if row == 1:
                    values = [
                        _share(v, b["mean_total_ms"])
                        for v, b in zip(values, data["bands"], strict=True)
                    ]
                ax.bar(labels, values, bottom=bottom, label=component)
                bottom = [a + b for a, b in zip(bottom, values, strict=True)]
            ax.set_ylabel("mean ms" if row == 0 else "% of the band's mean")
        axes[0, column].legend(fontsize="small")
        axes[0, column].set_title(f"{title}: where request time went")
        axes[1, column].set_xlabel("band of requests ranked by total latency")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    paths = expand_paths(args.files)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"batchwire trace-report: no such file: {missing[0]}", file=sys.stderr)
        return 1
    spans, malformed = load_spans(paths)
    report = build_report(
        spans, model=args.model, top=args.top, malformed=malformed, files=[str(p) for p in paths]
    )
    sys.stdout.write(render(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if not args.no_png and report["models"]:
        png = args.png or paths[0].with_name(paths[0].name + ".png")
        try:
            write_png(report, png)
        except ImportError:
            print(_PNG_HINT, file=sys.stderr)
        else:
            print(f"wrote {png}")
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def add_trace_report_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Register `batchwire trace-report FILE... [--top N] [--model M] [--json OUT]
    [--png PATH | --no-png]`."""
    parser = subparsers.add_parser(
        "trace-report",
        help="where request time went (queue, compute, decode/encode), from exported spans",
        description="Per latency band of requests: mean decode, queue, compute, encode and "
        "other time; the slowest requests with their batch; a stacked-bar PNG.",
    )
    parser.add_argument(
        "files", nargs="+", help="JSON-lines span files or globs (serve --trace-file)"
    )
    parser.add_argument("--model", default=None, help="only this model")
    parser.add_argument(
        "--top", type=_non_negative, default=10, help="slowest requests to list (default 10)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    png = parser.add_mutually_exclusive_group()
    png.add_argument("--png", type=Path, default=None, help="plot path (default FILE.png)")
    png.add_argument("--no-png", action="store_true", help="no plot")
    parser.set_defaults(func=_run)
