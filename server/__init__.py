"""Serving system: the gRPC front door around the model runtime."""
