"""batchwire: a high-throughput gRPC inference service (Open Inference Protocol)."""

__version__ = "0.1.0"
