"""`batchwire slo`: print a running server's SLO state (its `/slo` endpoint) as a table."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8002"


def fetch_snapshot(url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """GET `<url>/slo` and parse it.

    Raises:
        OSError: the server cannot be reached (URLError is an OSError).
        ValueError: the answer is not JSON.
    """
    with urllib.request.urlopen(url.rstrip("/") + "/slo", timeout=timeout_s) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.3f}%"


def render(snapshot: dict[str, Any]) -> str:
    """The human-readable table of one `/slo` snapshot."""
    if not snapshot:
        return "no model has an SLO (add an `slo:` block to its config.yaml)\n"
    lines = []
    for model, state in snapshot.items():
        objective = state["objective"]
        recent = state["recent"]
        lines.append(
            f"{model}: {objective['latency_objective'] * 100:g}% of requests under "
            f"{objective['latency_threshold_ms']:g} ms, "
            f"{objective['availability_objective'] * 100:g}% available"
        )
        latency = recent["latency_ms"]
        lines.append(
            f"  last {recent['window']}: {recent['requests']} ok requests, "
            f"p50 {_ms(latency.get('p50'))} ms, p90 {_ms(latency.get('p90'))} ms, "
            f"p99 {_ms(latency.get('p99'))} ms"
        )
        lines.append(
            f"  {'sli':<13} {'good':>9} {'events':>8} {'budget left':>12}  burn rates "
            f"(over {state['budget_window']} kept)"
        )
        for sli, values in state["slis"].items():
            rates = ", ".join(f"{w} {r:.2f}x" for w, r in values["burn_rates"].items())
            lines.append(
                f"  {sli:<13} {_pct(values['good_fraction']):>9} {values['events']:>8} "
                f"{_pct(values['budget_remaining']):>12}  {rates}"
            )
        alerts = state["alerts"]
        if alerts:
            for alert in alerts:
                lines.append(
                    f"  FIRING {alert['severity']} {alert['sli']} {alert['rule']}: burn "
                    f"{alert['burn_rate_long']:.1f}x long, {alert['burn_rate_short']:.1f}x short"
                )
        else:
            lines.append("  no alert firing")
    return "\n".join(lines) + "\n"


def _run(args: argparse.Namespace) -> int:
    try:
        snapshot = fetch_snapshot(args.url)
    except (OSError, ValueError) as exc:
        print(f"batchwire slo: cannot read {args.url}/slo: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        sys.stdout.write(render(snapshot))
    return 0


def add_slo_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `batchwire slo`."""
    parser = subparsers.add_parser(
        "slo", help="print a running server's SLOs: objectives, percentiles, budget, alerts"
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the server's metrics endpoint (default {DEFAULT_URL})"
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON snapshot")
    parser.set_defaults(func=_run)
