#!/usr/bin/env bash
# The main job on a fresh machine: install, build the demo model repository,
# start the local Triton server on 127.0.0.1, predict one slide, stop the server.
#
#   bash scripts/demo.sh [SLIDE]
#
# SLIDE defaults to ../shared/slides/CMU-1-Small-Region.svs. The result is
# written to outputs/prediction.json. Ports: HISTOMET_GRPC_PORT (8001),
# HISTOMET_HTTP_PORT (8000), HISTOMET_METRICS_PORT (8002).
set -euo pipefail
cd "$(dirname "$0")/.."
slide=${1:-../shared/slides/CMU-1-Small-Region.svs}
repository=${HISTOMET_REPOSITORY:-model_repository}
grpc_port=${HISTOMET_GRPC_PORT:-8001}
http_port=${HISTOMET_HTTP_PORT:-8000}
metrics_port=${HISTOMET_METRICS_PORT:-8002}

bash scripts/install.sh
bin=.venv/bin

if [[ ! -f "$repository/histomet/1/manifest.json" ]]; then
  "$bin/histomet" export demo --repository "$repository"
else
  echo "histomet: using the existing demo repository in $repository (delete it to rebuild)"
fi

mkdir -p outputs
"$bin/histomet" serve --repository "$repository" --grpc-port "$grpc_port" \
  --http-port "$http_port" --metrics-port "$metrics_port" \
  --log-file outputs/tritonserver.log &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

# Wait for readiness, or for the server process to fail.
for _ in $(seq 1 720); do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "histomet: error: the server did not start (see the message above and" \
      "outputs/tritonserver.log). Ports come from HISTOMET_GRPC_PORT," \
      "HISTOMET_HTTP_PORT and HISTOMET_METRICS_PORT" >&2
    exit 4
  fi
  if "$bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$http_port/v2/health/ready', timeout=1)" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.5
done
if [[ -z "${ready:-}" ]]; then
  echo "histomet: error: the server was not ready after 6 minutes; see outputs/tritonserver.log" >&2
  exit 4
fi

"$bin/histomet-client" predict "$slide" --url "127.0.0.1:$grpc_port" \
  --json outputs/prediction.json
echo "histomet: result written to outputs/prediction.json"
