"""Helpers shared by the ops/ tests: tool lookup and rendered manifests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
OPS = REPO_ROOT / "ops"
K8S = OPS / "k8s"
VENV_BIN = Path(sys.executable).parent
# npm prefix where scripts/install-ops-tools.sh puts the prometheus-operator schemas.
NODE_TOOLS = VENV_BIN.parent / "ops-tools"

INSTALL_HINT = (
    "run: bash scripts/install-ops-tools.sh (as root for the Debian packages)"
)

# The flags of the production Deployment that change what Triton serves or
# exposes. The local test servers start with them, so the tests check the
# flags that the cluster runs.
LOCAL_TRITON_FLAGS = (
    "--metrics-config",
    "--grpc-restricted-protocol",
    "--http-restricted-api",
)


def require_tool(name: str) -> Path:
    """Return the path of an ops tool, or skip the test with the install command."""
    for candidate in (VENV_BIN / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip(f"{name} not installed; {INSTALL_HINT}")


def render(kustomization: Path) -> list[dict]:
    """Render a kustomization with kubectl's built-in kustomize and parse every document."""
    kubectl = require_tool("kubectl")
    completed = subprocess.run(
        [str(kubectl), "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    return [doc for doc in yaml.safe_load_all(completed.stdout) if doc]


def find(documents: list[dict], kind: str, name: str | None = None) -> dict:
    """Return the one document of ``kind`` (and ``name``), failing when there is not exactly one."""
    matches = [
        doc
        for doc in documents
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def production_triton_flags(admin_key: str) -> tuple[str, ...]:
    """Return the production Deployment's Triton flags that local servers must share.

    ``$(TRITON_ADMIN_KEY)``, which the kubelet expands from the Secret, is
    replaced by ``admin_key``.
    """
    deployment = find(render(K8S / "overlays" / "production"), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    flags = [
        arg.replace("$(TRITON_ADMIN_KEY)", admin_key)
        for arg in container["args"]
        if arg.split("=", 1)[0] in LOCAL_TRITON_FLAGS
    ]
    assert len(flags) == len(LOCAL_TRITON_FLAGS), container["args"]
    return tuple(flags)
