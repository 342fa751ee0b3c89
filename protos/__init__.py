"""Open Inference Protocol (KServe v2) gRPC definitions and their generated Python stubs."""
