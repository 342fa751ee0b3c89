#!/usr/bin/env bash
# Entrypoint of the Dockerfile.gpu image: build the TensorRT plans this GPU lacks, then serve.
#
# For every model whose config.yaml has `gpu.engine: tensorrt`, `batchwire build-engine --all`
# builds (and validates against ONNX Runtime) a plan for the GPU, TensorRT version and
# precision at hand, unless `<version>/plans/` already holds one built for exactly those; a
# plan from another GPU or TensorRT version is never loaded. Then `batchwire serve` runs as
# PID 1 (exec), so SIGTERM drains in-flight requests. Arguments go to `batchwire serve`.
#
# Environment:
#   BATCHWIRE_MODEL_REPOSITORY  model repository (default /models; must be writable for plans)
#   BATCHWIRE_PORT              gRPC port (default 8001)
#   BATCHWIRE_STRICT_BUILD      1 = exit when a plan fails to build or validate (default 0:
#                               such a model is served by its CPU backend, with a log line)
set -euo pipefail

repo="${BATCHWIRE_MODEL_REPOSITORY:-/models}"
port="${BATCHWIRE_PORT:-8001}"
strict="${BATCHWIRE_STRICT_BUILD:-0}"

log() { echo "gpu-entrypoint: $*" >&2; }

if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    gpu="$(python -c 'from engines.tensorrt import current_gpu_name; print(current_gpu_name(0))')"
    log "GPU ${gpu}; building missing TensorRT plans in ${repo}"
    if ! batchwire build-engine --all --model-repository "${repo}"; then
        if [ "${strict}" = "1" ]; then
            log "a TensorRT plan failed to build or validate; exiting (BATCHWIRE_STRICT_BUILD=1)"
            exit 1
        fi
        log "a TensorRT plan failed to build or validate; that model serves on its CPU backend"
    fi
else
    log "no CUDA device visible (run with --gpus all); models serve on their CPU backends"
fi

exec batchwire serve --model-repository "${repo}" --host 0.0.0.0 --port "${port}" "$@"
