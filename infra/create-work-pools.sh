#!/usr/bin/env bash
# Create (or update) the process work pools the deployments in infra/prefect.yaml use.
#   GPU_WORKERS=2 infra/create-work-pools.sh
# loraflow-gpu: one slot per GPU worker, so no worker ever runs two segments at once.
# loraflow-control: light orchestrating runs of finetune/distributed (CPU only).
# For docker or kubernetes pools pass POOL_TYPE=docker|kubernetes (see infra/README.md).
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api}"
GPU_WORKERS="${GPU_WORKERS:-1}"
POOL_TYPE="${POOL_TYPE:-process}"

prefect work-pool create loraflow-gpu --type "$POOL_TYPE" --overwrite
prefect work-pool set-concurrency-limit loraflow-gpu "$GPU_WORKERS"
prefect work-pool create loraflow-control --type process --overwrite
# a worker that dies with its machine reports nothing: mark its silent segment runs Crashed
# (so they are dispatched again) after three missed heartbeats (see infra/README.md)
loraflow detect-crashes --after-silence "${CRASH_AFTER_SILENCE:-540}"
