"""Kubernetes manifests in ops/k8s: rendered with kustomize, validated offline.

Built-in kinds are validated with kubernetes-validate, which bundles the
Kubernetes JSON schemas. The ServiceMonitor and PrometheusRule are validated
with the prometheus-operator CRD schemas from the npm package
@kubernetes-models/prometheus-operator. Nothing is downloaded at test time.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import kubernetes_validate
import pytest
import yaml

from .conftest import loopback_config
from .ops_support import K8S
from .ops_support import NODE_TOOLS
from .ops_support import find
from .ops_support import production_triton_flags
from .ops_support import render
from .ops_support import require_tool

# The oldest Kubernetes release the manifests target: backoffLimitPerIndex in
# Indexed Jobs is GA from 1.33.
KUBERNETES_VERSION = "1.33"

KUSTOMIZATIONS = [
    "base",
    "overlays/production",
    "overlays/s3",
    "batch",
    "prometheus-adapter",
    "namespace",
    "monitoring",
]

# Reads one resource as JSON on stdin and validates it with the model class of
# its kind. On a schema violation validate() throws, so node exits non-zero.
_VALIDATE_CUSTOM_RESOURCE = """
let text = "";
for await (const chunk of process.stdin) text += chunk;
const resource = JSON.parse(text);
const module = await import(
  `@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/${resource.kind}`
);
new module[resource.kind](resource).validate();
"""


def validate_custom_resource(document: dict) -> subprocess.CompletedProcess:
    """Validate a prometheus-operator resource against its CRD schema with node."""
    node = require_tool("node")
    if not (NODE_TOOLS / "node_modules" / "@kubernetes-models").is_dir():
        pytest.skip(
            "prometheus-operator schemas not installed; run scripts/install-ops-tools.sh"
        )
    return subprocess.run(
        [str(node), "--input-type=module", "-e", _VALIDATE_CUSTOM_RESOURCE],
        input=json.dumps(document),
        capture_output=True,
        text=True,
        cwd=NODE_TOOLS,
        timeout=60,
    )


def validate(document: dict) -> None:
    """Validate one rendered document, failing on a kind that has no schema."""
    if document["apiVersion"] == "monitoring.coreos.com/v1":
        completed = validate_custom_resource(document)
        assert completed.returncode == 0, completed.stderr.strip().splitlines()[-1:]
        return
    # strict: unknown fields are errors, as with kubectl's server-side validation.
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return render(K8S / "overlays" / "production")


@pytest.fixture(scope="module")
def batch() -> list[dict]:
    return render(K8S / "batch")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_manifests_validate(kustomization):
    documents = render(K8S / kustomization)

    assert documents
    for document in documents:
        validate(document)


def test_validator_rejects_invalid_deployment(production):
    deployment = copy.deepcopy(find(production, "Deployment"))
    deployment["spec"]["replicas"] = "two"
    misspelt = copy.deepcopy(find(production, "Deployment"))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}

    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(misspelt)


def test_validator_rejects_invalid_service_monitor(production):
    monitor = copy.deepcopy(find(production, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    # NOTE: the CRD schema does not forbid unknown fields, so a misspelt key in
    # a ServiceMonitor passes here as it would pass the API server's pruning.

    assert validate_custom_resource(monitor).returncode != 0


def test_overlays_render_distinct_model_sources():
    production = find(render(K8S / "overlays" / "production"), "ConfigMap")
    s3 = render(K8S / "overlays" / "s3")

    assert production["data"]["MODEL_REPOSITORY"].startswith("/models/")
    assert find(s3, "ConfigMap")["data"]["MODEL_REPOSITORY"].startswith("s3://")
    assert not [doc for doc in s3 if doc["kind"] == "PersistentVolumeClaim"]
    volumes = find(s3, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert "model-repository" not in {volume["name"] for volume in volumes}


def _pod_specs(documents: list[dict]) -> list[dict]:
    specs = []
    for document in documents:
        if document["kind"] in ("Deployment", "Job"):
            specs.append(document["spec"]["template"]["spec"])
    return specs


@pytest.mark.parametrize(
    "kustomization", ["overlays/production", "overlays/s3", "batch"]
)
def test_pods_meet_restricted_security(kustomization):
    specs = _pod_specs(render(K8S / kustomization))

    assert specs
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            writable = {mount["mountPath"] for mount in container["volumeMounts"]}
            assert "/tmp" in writable


def test_triton_requests_gpu_and_probes_health(production):
    container = find(production, "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    resources = container["resources"]

    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--strict-readiness=true" in container["args"]


def test_service_and_policies_match_pod_ports(production):
    deployment = find(production, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {port["name"] for port in container["ports"]}
    service = find(production, "Service")
    policy = find(production, "NetworkPolicy")
    budget = find(production, "PodDisruptionBudget")
    monitor = find(production, "ServiceMonitor")

    assert {port["targetPort"] for port in service["spec"]["ports"]} == port_names
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy_ports = {
        port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]
    }
    assert policy_ports == port_names
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"]["labels"].items()
    )


def test_model_version_config_rolls_deployment(production):
    config_map = find(production, "ConfigMap")
    container = find(production, "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    referenced = [source["configMapRef"]["name"] for source in container["envFrom"]]

    # kustomize appends a content hash, so a new version is a new pod template.
    assert re.fullmatch(
        r"histomet-model-version-[a-z0-9]{10}", config_map["metadata"]["name"]
    )
    assert referenced == [config_map["metadata"]["name"]]
    assert "--model-repository=$(MODEL_REPOSITORY)" in container["args"]


def test_admin_key_comes_from_secret(production):
    container = find(production, "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {item["name"]: item for item in container["env"]}
    restricted = [arg for arg in container["args"] if "restricted" in arg]

    assert (
        env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"]
        == "histomet-triton-admin"
    )
    assert len(restricted) == 2
    for arg in restricted:
        assert arg.endswith(":admin-key=$(TRITON_ADMIN_KEY)")
        assert "model-repository" in arg


def test_hpa_metric_served_by_adapter_rule(production):
    hpa = find(production, "HorizontalPodAutoscaler")
    adapter = find(render(K8S / "prometheus-adapter"), "ConfigMap")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"] for rule in rules}

    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == find(production, "Deployment")["metadata"]["name"]
    )
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in served


def test_batch_job_shards_by_completion_index(batch):
    job = find(batch, "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    shard = args[args.index("--shard") + 1]

    assert job["spec"]["completionMode"] == "Indexed"
    assert shard == f"$(JOB_COMPLETION_INDEX)/{job['spec']['completions']}"
    assert args[:3] == ["predict", "--manifest", "/slides/manifest.csv"]
    assert (
        args[args.index("--results") + 1]
        == "/results/results-$(JOB_COMPLETION_INDEX).jsonl"
    )
    assert job["spec"]["template"]["metadata"]["labels"]["histomet.io/client"] == "true"
    assert "--pushgateway" in args


def test_batch_job_options_exist_in_client():
    from histomet.client.cli import build_parser

    job = find(render(K8S / "batch"), "Job")
    options = {
        arg
        for arg in job["spec"]["template"]["spec"]["containers"][0]["args"]
        if arg.startswith("--")
    }
    known = set()
    predict = build_parser()._subparsers._group_actions[0].choices["predict"]
    for action in predict._actions:
        known.update(action.option_strings)
    assert options <= known, sorted(options - known)
    # The whole command line parses, with the index Kubernetes substitutes.
    args = [
        arg.replace("$(JOB_COMPLETION_INDEX)", "3")
        for arg in job["spec"]["template"]["spec"]["containers"][0]["args"]
    ]
    parsed = build_parser().parse_args(args)
    assert parsed.shard == (3, job["spec"]["completions"])
    assert str(parsed.results) == "/results/results-3.jsonl"


def _http(
    url: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> int:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow
def test_restricted_api_needs_admin_key(tiny_repository, tmp_path):
    """The Deployment's restricted-API flags, run by the real tritonserver."""
    from histomet.serve.launcher import LocalTritonServer

    key = "test-admin-key"
    config = loopback_config(
        tiny_repository, startup_timeout_s=120, extra_args=production_triton_flags(key)
    )
    server = LocalTritonServer(config, log_path=tmp_path / "tritonserver.log")
    server.start()
    base = f"http://127.0.0.1:{config.http_port}"
    try:
        ready = _http(f"{base}/v2/health/ready")
        model_config = _http(f"{base}/v2/models/histomet/config")
        index_open = _http(f"{base}/v2/repository/index", body=b"{}")
        index_wrong = _http(
            f"{base}/v2/repository/index", {"admin-key": "wrong"}, b"{}"
        )
        index_keyed = _http(f"{base}/v2/repository/index", {"admin-key": key}, b"{}")
        unload_open = _http(f"{base}/v2/repository/models/histomet/unload", body=b"{}")
    finally:
        server.stop()

    assert ready == 200
    assert model_config == 200
    assert index_open == 403
    assert index_wrong == 403
    assert index_keyed == 200
    assert unload_open == 403


def test_prometheus_rule_matches_rule_files():
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import build_prometheusrule, sys; sys.stdout.write(build_prometheusrule.render())",
        ],
        cwd=K8S / "monitoring",
        capture_output=True,
        text=True,
        timeout=60,
    )
    committed = K8S / "monitoring" / "prometheusrule.yaml"

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == committed.read_text(), (
        "run: python ops/k8s/monitoring/build_prometheusrule.py"
    )


def test_validator_rejects_invalid_prometheus_rule():
    rule = find(render(K8S / "monitoring"), "PrometheusRule")
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"

    assert validate_custom_resource(rule).returncode == 0
    assert validate_custom_resource(broken).returncode != 0
