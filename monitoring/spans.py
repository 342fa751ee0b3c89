"""Names of batchwire's spans and span attributes: the contract between the tracer, the
SLO span processor and `batchwire trace-report`.

The JSON-lines file (`--trace-file`) holds one span per line:

    {"trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_span_id": "<16 hex>" | null,
     "name": ..., "kind": "SERVER" | "INTERNAL", "start_ns": <Unix ns>, "end_ns": <Unix ns>,
     "status": "ERROR", "attributes": {...},
     "links": [{"trace_id": ..., "span_id": ..., "attributes": {...}}, ...],
     "resource": {...}}

The fields up to `end_ns` are always there. The others are left out at their defaults, as
protobuf's JSON mapping leaves them out: `status` (default `UNSET`), `attributes` (none),
`links` (none), and `resource`, which the first line of each write carries and the others
leave out (all the file's spans come from one resource).
"""

from __future__ import annotations

from typing import Final

#: Instrumentation scope of every batchwire span.
SCOPE: Final = "batchwire"

# Span names. The server span is named after the RPC (`Service/Method`), per the RPC
# semantic conventions; the others are batchwire's own.
SERVICE: Final = "inference.GRPCInferenceService"
DECODE: Final = "decode"
"""Child of the server span: protobuf -> numpy and validation against the model."""
QUEUE: Final = "queue"
"""Child of the server span: from the batcher's queue to the start of the batch."""
ENCODE: Final = "encode"
"""Child of the server span: numpy -> protobuf."""
BATCH: Final = "batch"
"""Root of its own trace: one executed batch, linked to each member request's server span."""
ENGINE: Final = "engine"
"""Child of a `batch` span (batched lane) or of the server span (CPU lane): the compute."""

# RPC semantic-convention attributes (the current names, plus the older ones that
# many backends still key on).
RPC_SYSTEM_NAME: Final = "rpc.system.name"
RPC_METHOD: Final = "rpc.method"
"""Fully qualified: `inference.GRPCInferenceService/ModelInfer`."""
RPC_RESPONSE_STATUS_CODE: Final = "rpc.response.status_code"
"""gRPC status name as a string, e.g. `OK`, `INVALID_ARGUMENT`."""
RPC_SYSTEM: Final = "rpc.system"
RPC_SERVICE: Final = "rpc.service"
RPC_GRPC_STATUS_CODE: Final = "rpc.grpc.status_code"
"""gRPC status as an int (older conventions)."""

# batchwire attributes.
MODEL_NAME: Final = "batchwire.model.name"
MODEL_VERSION: Final = "batchwire.model.version"
LANE: Final = "batchwire.lane"
"""`cpu` (the CPU-concurrency lane) or `batched` (the dynamic batcher)."""
REQUEST_SAMPLES: Final = "batchwire.request.samples"
REQUEST_ID: Final = "batchwire.request.id"
BATCH_SIZE: Final = "batchwire.batch.size"
"""Samples in the batch (before padding)."""
BATCH_PADDED_SIZE: Final = "batchwire.batch.padded_size"
"""Samples the engine ran (bucket padding on GPU engines; equal to the size otherwise)."""
BATCH_REQUESTS: Final = "batchwire.batch.requests"
