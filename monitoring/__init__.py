"""Monitoring system: traces, metrics, latency SLOs and input drift (see ARCHITECTURE.md).

Empty until the observability issue lands; the server exposes Triton-style statistics
through the ModelStatistics RPC meanwhile.
"""
