"""deploy/ checked offline: the Kubernetes manifests against the Kubernetes schemas (and the
KEDA and Prometheus Operator resources against their CRDs' structure), the kustomization,
the ECS task definition against the ECS API model, the IAM policies' actions, the image's
Dockerfile and its pinned dependencies."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import string
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from botocore.session import get_session
from botocore.validate import ParamValidator
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
IAM = DEPLOY / "iam"

# The oldest Kubernetes minor the manifests support and the newest the schemas ship.
KUBERNETES_VERSIONS = ("1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2]))

NAME = "supersim-worker"
HTTP_PORT = 9400
NON_ROOT_UID = 10001

# What a graceful stop may take: finishing the in-flight batch (SUPERSIM_SHUTDOWN_TIMEOUT),
# then lease releases and pending alert deliveries, then the process's exit. The grace the
# orchestrator gives (terminationGracePeriodSeconds, stopTimeout) must be longer.
SHUTDOWN_TIMEOUT_DEFAULT = 20.0
RELEASE_AND_ALERT_GRACE = 5.0
EXIT_MARGIN = 10.0

# The Kinesis calls the worker makes, and those enhanced fan-out adds when enabled.
WORKER_KINESIS_CALLS = {"ListShards", "DescribeStreamSummary", "GetShardIterator", "GetRecords"}
FANOUT_KINESIS_CALLS = {
    "RegisterStreamConsumer",
    "DescribeStreamConsumer",
    "SubscribeToShard",
    "DeregisterStreamConsumer",
}
# Kinesis calls made only by local development commands, against a local server.
LOCAL_ONLY_SOURCES = ("worker/devtools/", "worker/cli/replay.py", "worker/cli/simulate.py")

# Every IAM document in deploy/iam/ and exactly the actions it may name.
IAM_ACTIONS = {
    "consumer-policy.json": {f"kinesis:{call}" for call in WORKER_KINESIS_CALLS} | {"kms:Decrypt"},
    "consumer-fanout-policy.json": {f"kinesis:{call}" for call in FANOUT_KINESIS_CALLS},
    "keda-operator-policy.json": {"kinesis:DescribeStreamSummary"},
    "publisher-policy.json": {
        "kinesis:PutRecord",
        "kinesis:PutRecords",
        "kinesis:DescribeStream",
        "kms:GenerateDataKey",
    },
    "ecs-execution-policy.json": {
        "ecr:GetAuthorizationToken",
        "ecr:BatchCheckLayerAvailability",
        "ecr:BatchGetImage",
        "ecr:GetDownloadUrlForLayer",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "secretsmanager:GetSecretValue",
    },
    "consumer-trust-eks.json": {"sts:AssumeRoleWithWebIdentity"},
    "consumer-trust-eks-pod-identity.json": {"sts:AssumeRole", "sts:TagSession"},
    "ecs-tasks-trust.json": {"sts:AssumeRole"},
    "publisher-trust.json": {"sts:AssumeRole"},
}
# Actions that act on no particular resource, so may only be granted on "*".
ACCOUNT_WIDE_ACTIONS = {"ecr:GetAuthorizationToken"}
# Permissions that are no API operation of their own (STS checks it on an AssumeRole).
PERMISSION_ONLY_ACTIONS = {"sts:TagSession"}
IAM_PREFIX_TO_SERVICE = {
    "kinesis": "kinesis",
    "kms": "kms",
    "sts": "sts",
    "ecr": "ecr",
    "logs": "logs",
    "secretsmanager": "secretsmanager",
}

# The ${Name} parameters of the JSON files in deploy/, with example values.
PARAMETERS = {
    "AccountId": "123456789012",
    "Region": "eu-west-1",
    "StreamName": "supersim-connection-events",
    "KmsKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    "ConsumerName": "supersim-worker",
    "OidcProvider": "oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE",
    "PublisherAccountId": "210987654321",
    "ExternalId": "an-external-id-from-the-sink",
    "RedisSecretArn": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:supersim-redis-AbCdEf",
    "ImageTag": "0.1.0",
}

# Development tools that must never reach the image's constraints.
DEV_ONLY = {"pytest", "hypothesis", "ruff", "mypy", "moto", "kubernetes-validate"}


# ---- loading ---------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


@cache
def kustomization() -> dict[str, Any]:
    (doc,) = load_documents(K8S / "kustomization.yaml")
    return doc


@cache
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource of the base by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in manifest_files():
        for doc in load_documents(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def deployment() -> dict[str, Any]:
    return manifests()[("Deployment", NAME)]


def backfill() -> dict[str, Any]:
    return manifests()[("CronJob", f"{NAME}-backfill")]


def pod_specs() -> dict[str, dict[str, Any]]:
    """The pod templates of the Deployment and of the backfill Job."""
    return {
        "deployment": deployment()["spec"]["template"]["spec"],
        "backfill": backfill()["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    }


def config_literals() -> dict[str, str]:
    """The settings of the generated supersim-worker ConfigMap."""
    (generator,) = [g for g in kustomization()["configMapGenerator"] if g["name"] == NAME]
    return dict(literal.split("=", 1) for literal in generator["literals"])


def container_env(container: dict[str, Any]) -> dict[str, str | None]:
    """A container's environment: the ConfigMap's settings, then its own ``env`` (None for a
    value taken from a Secret)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == NAME, source
        env.update(config_literals())
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def shutdown_bound(env: dict[str, str | None]) -> float:
    timeout = float(env.get("SUPERSIM_SHUTDOWN_TIMEOUT") or SHUTDOWN_TIMEOUT_DEFAULT)
    return timeout + RELEASE_AND_ALERT_GRACE + EXIT_MARGIN


def render(path: Path) -> str:
    return string.Template(path.read_text(encoding="utf-8")).substitute(PARAMETERS)


def iam_statements(path: Path) -> Iterator[dict[str, Any]]:
    document = json.loads(render(path))
    assert document["Version"] == "2012-10-17"
    statements = document["Statement"]
    yield from statements if isinstance(statements, list) else [statements]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


# ---- the structure of the CRD resources -------------------------------------------------------
# Not in the Kubernetes schemas: checked against the fields of their CRDs that matter here, with
# unknown fields refused, and Kubernetes' own types (ObjectMeta, LabelSelector, HPA behaviour)
# taken from the Kubernetes schemas.

K8S_DEFS = "/api/_definitions.json#/$defs/io.k8s."
DURATION = r"^(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?$"
# Each CRD's spec: the fields that matter here. additionalProperties: false refuses the rest.
CRD_SPECS = yaml.safe_load(
    rf"""
monitoring.coreos.com/v1 ServiceMonitor:
  type: object
  additionalProperties: false
  required: [selector, endpoints]
  properties:
    selector: {{$ref: "{K8S_DEFS}apimachinery.pkg.apis.meta.v1.LabelSelector"}}
    namespaceSelector: {{type: object}}
    jobLabel: {{type: string}}
    endpoints:
      type: array
      minItems: 1
      items:
        type: object
        additionalProperties: false
        required: [port]
        properties:
          port: {{type: string}}
          path: {{type: string, pattern: "^/"}}
          scheme: {{enum: [http, https]}}
          interval: {{type: string, pattern: "{DURATION}"}}
          scrapeTimeout: {{type: string, pattern: "{DURATION}"}}
          honorLabels: {{type: boolean}}
          relabelings: {{type: array}}
          metricRelabelings: {{type: array}}

keda.sh/v1alpha1 ScaledObject:
  type: object
  additionalProperties: false
  required: [scaleTargetRef, triggers]
  properties:
    scaleTargetRef:
      type: object
      additionalProperties: false
      required: [name]
      properties:
        apiVersion: {{type: string}}
        kind: {{type: string}}
        name: {{type: string}}
        envSourceContainerName: {{type: string}}
    pollingInterval: {{type: integer, minimum: 1}}
    cooldownPeriod: {{type: integer, minimum: 0}}
    minReplicaCount: {{type: integer, minimum: 0}}
    maxReplicaCount: {{type: integer, minimum: 1}}
    advanced:
      type: object
      additionalProperties: false
      properties:
        restoreToOriginalReplicaCount: {{type: boolean}}
        horizontalPodAutoscalerConfig:
          type: object
          additionalProperties: false
          properties:
            name: {{type: string}}
            behavior: {{$ref: "{K8S_DEFS}api.autoscaling.v2.HorizontalPodAutoscalerBehavior"}}
    triggers:
      type: array
      minItems: 1
      items:
        type: object
        additionalProperties: false
        required: [type, metadata]
        properties:
          type: {{type: string}}
          name: {{type: string}}
          metricType: {{enum: [AverageValue, Value, Utilization]}}
          # KEDA's trigger metadata is a map of strings: a bare YAML number is refused.
          metadata: {{type: object, additionalProperties: {{type: string}}}}
          authenticationRef:
            type: object
            additionalProperties: false
            required: [name]
            properties:
              name: {{type: string}}
              kind: {{enum: [TriggerAuthentication, ClusterTriggerAuthentication]}}
        if: {{properties: {{type: {{const: aws-kinesis-stream}}}}}}
        then:
          properties:
            metadata:
              additionalProperties: false
              required: [streamName, awsRegion]
              properties:
                streamName: {{type: string, minLength: 1}}
                awsRegion: {{type: string, pattern: "^[a-z]{{2}}(-[a-z]+)+-[0-9]$"}}
                awsEndpoint: {{type: string}}
                shardCount: {{type: string, pattern: "^[1-9][0-9]*$"}}
                activationShardCount: {{type: string, pattern: "^[0-9]+$"}}

keda.sh/v1alpha1 TriggerAuthentication:
  type: object
  additionalProperties: false
  properties:
    podIdentity:
      type: object
      additionalProperties: false
      required: [provider]
      properties:
        provider: {{enum: [none, aws, aws-eks, azure-workload, gcp]}}
        roleArn: {{type: string, pattern: "^arn:aws:iam::"}}
        identityOwner: {{enum: [keda, workload]}}
      # KEDA: roleArn and identityOwner are mutually exclusive.
      not: {{required: [roleArn, identityOwner]}}
    secretTargetRef: {{type: array}}
    env: {{type: array}}
"""
)


def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """A resource of a CRD: Kubernetes' ObjectMeta, and the spec from CRD_SPECS."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        # Where the $refs to Kubernetes' own types resolve: kubernetes-validate's definitions.
        "$id": f"https://kubernetes.io/api/crd/{kind.lower()}",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {
                "$ref": K8S_DEFS + "apimachinery.pkg.apis.meta.v1.ObjectMeta",
                "required": ["name"],
            },
            "spec": CRD_SPECS[f"{api_version} {kind}"],
        },
    }


CRD_SCHEMAS = {tuple(key.split()): crd_schema(*key.split()) for key in CRD_SPECS}


@cache
def k8s_definitions(version: str) -> referencing.Resource[Any]:
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = root / f"v{version}.0-local-strict" / "_definitions.json"
    return referencing.Resource.from_contents(json.loads(path.read_text(encoding="utf-8")))


def crd_validator(key: tuple[str, str], version: str) -> jsonschema.Draft202012Validator:
    registry = referencing.Registry().with_resource(
        "https://kubernetes.io/api/_definitions.json", k8s_definitions(version)
    )
    return jsonschema.Draft202012Validator(CRD_SCHEMAS[key], registry=registry)


def validate_document(doc: dict[str, Any], version: str) -> None:
    """Validate one resource: against the Kubernetes schemas when its kind is Kubernetes' own,
    else against CRD_SCHEMAS; a kind in neither fails."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in CRD_SCHEMAS:
        crd_validator(key, version).validate(doc)
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{key}: in neither the Kubernetes schemas nor CRD_SCHEMAS ({exc.message})")
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{key} {doc['metadata']['name']}: {where}: {exc.message} (k8s {version})")


# ---- Kubernetes: schemas and kustomization ----------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: path.name)
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    """Each resource in deploy/kubernetes/ is valid for Kubernetes (strict: no unknown field),
    or for its CRD's structure; nothing is left unchecked."""
    docs = load_documents(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        validate_document(doc, version)


def test_the_crd_check_refuses_what_the_crd_would() -> None:
    """The CRD structure checks are not vacuous: a numeric shardCount, an unknown field or a
    missing trigger is refused."""
    scaled = manifests()[("ScaledObject", NAME)]
    broken = [json.loads(json.dumps(scaled)) for _ in range(3)]  # copies of a valid one
    broken[0]["spec"]["triggers"][0]["metadata"]["shardCount"] = 2
    broken[1]["spec"]["replicas"] = 3
    del broken[2]["spec"]["triggers"]
    validator = crd_validator(("keda.sh/v1alpha1", "ScaledObject"), KUBERNETES_VERSIONS[-1])
    validator.validate(scaled)
    for doc in broken:
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(doc)


def test_kustomization_lists_every_manifest_once() -> None:
    """kustomization.yaml's resources are exactly the manifests in its folder, each once."""
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    assert set(resources) == {path.name for path in manifest_files()}


def test_kustomization_has_only_known_fields() -> None:
    """kustomization.yaml uses kustomize's own fields, its image entry names the manifests'
    image, and its generated settings are KEY=VALUE lines."""
    doc = kustomization()
    assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert doc["kind"] == "Kustomization"
    known = {
        "apiVersion", "kind", "namespace", "resources", "images", "configMapGenerator",
        "labels", "patches", "replacements", "components",
    }  # fmt: skip
    assert set(doc) <= known, set(doc) - known
    images = {image["name"] for image in doc["images"]}
    for spec in pod_specs().values():
        assert {c["image"] for c in spec["containers"]} <= images
    for generator in doc["configMapGenerator"]:
        for literal in generator["literals"]:
            assert re.fullmatch(r"SUPERSIM_[A-Z0-9_]+=.*", literal), literal


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """The resources `kubectl kustomize` renders from ``directory`` (skips without kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize build is not checked")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_kustomize_renders_the_base_into_valid_resources() -> None:
    """`kubectl kustomize` builds the base, and every resource it renders is valid too."""
    rendered = kustomize_build(K8S)
    kinds = {doc["kind"] for doc in rendered}
    assert kinds == {kind for kind, _ in manifests()} | {"ConfigMap"}
    for doc in rendered:
        validate_document(doc, KUBERNETES_VERSIONS[-1])
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization()["namespace"]
    (config,) = [doc for doc in rendered if doc["kind"] == "ConfigMap"]
    assert config["data"] == config_literals()


def test_the_readme_overlays_build(tmp_path: Path) -> None:
    """deploy/README.md's overlays build on the base: the production one sets the image, stream,
    region and role everywhere; the one without KEDA drops its resources and sets replicas."""
    blocks = re.findall(r"```yaml\n(.*?)```", (DEPLOY / "README.md").read_text(), re.DOTALL)
    production, without_keda = blocks
    shutil.copytree(K8S, tmp_path / "deploy" / "kubernetes")
    overlays = tmp_path / "overlays"
    (overlays / "production").mkdir(parents=True)
    (overlays / "production" / "kustomization.yaml").write_text(production)
    (overlays / "without-keda").mkdir()
    (overlays / "without-keda" / "kustomization.yaml").write_text(
        "resources:\n  - ../../deploy/kubernetes\n" + without_keda
    )

    rendered = {
        (d["kind"], d["metadata"]["name"]): d for d in kustomize_build(overlays / "production")
    }
    for doc in rendered.values():
        validate_document(doc, KUBERNETES_VERSIONS[-1])
    (config,) = [doc for (kind, _), doc in rendered.items() if kind == "ConfigMap"]
    trigger = rendered[("ScaledObject", NAME)]["spec"]["triggers"][0]["metadata"]
    assert trigger["streamName"] == config["data"]["SUPERSIM_STREAM_NAME"]
    assert trigger["awsRegion"] == config["data"]["SUPERSIM_REGION"] != "us-east-1"
    role = rendered[("ServiceAccount", NAME)]["metadata"]["annotations"][
        "eks.amazonaws.com/role-arn"
    ]
    assert "ACCOUNT_ID" not in role
    (container,) = rendered[("Deployment", NAME)]["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(".amazonaws.com/supersim-worker:0.1.0")

    rendered = {
        (d["kind"], d["metadata"]["name"]): d for d in kustomize_build(overlays / "without-keda")
    }
    assert not {kind for kind, _ in rendered} & {
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
    }
    assert rendered[("Deployment", NAME)]["spec"]["replicas"] >= 2


# ---- Kubernetes: what the worker needs -------------------------------------------------------


@pytest.mark.parametrize("workload", ["deployment", "backfill"])
def test_pods_run_locked_down(workload: str) -> None:
    """Non-root, read-only root, no privilege escalation, no capabilities, no API token and no
    service-link variables (they would be refused as unknown SUPERSIM_ settings)."""
    spec = pod_specs()[workload]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == NON_ROOT_UID
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["serviceAccountName"] == NAME
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "add" not in context["capabilities"]
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["requests"]["memory"]
        assert container["resources"]["limits"]["memory"]


@pytest.mark.parametrize("workload", ["deployment", "backfill"])
def test_grace_period_outlasts_the_shutdown_bound(workload: str) -> None:
    """terminationGracePeriodSeconds is longer than SUPERSIM_SHUTDOWN_TIMEOUT plus lease
    releases, alert delivery and exit, so a stop never cuts a checkpoint short."""
    spec = pod_specs()[workload]
    (container,) = spec["containers"]
    bound = shutdown_bound(container_env(container))
    assert spec["terminationGracePeriodSeconds"] >= bound, (
        f"{workload}: grace {spec['terminationGracePeriodSeconds']} s < shutdown bound {bound} s"
    )


@pytest.mark.parametrize("workload", ["deployment", "backfill"])
def test_settings_are_the_production_ones(workload: str) -> None:
    """Every replica refuses an evicting Redis, runs the four handlers, serves HTTP on the
    probes' port and logs JSON; the Redis URL comes from the Secret; the backfill has its own
    consumer group."""
    (container,) = pod_specs()[workload]["containers"]
    env = container_env(container)
    assert env["SUPERSIM_REQUIRE_NOEVICTION"] == "true"
    assert env["SUPERSIM_HANDLERS"] == "metering,rejections,data_limit,attach_loops"
    assert env["SUPERSIM_HTTP_PORT"] == str(HTTP_PORT)
    assert env["SUPERSIM_LOG_FORMAT"] == "json"
    assert env["SUPERSIM_STREAM_NAME"]
    assert "SUPERSIM_REDIS_URL" in env
    assert env["SUPERSIM_REDIS_URL"] is None, "the Redis URL (a secret) comes from a Secret"
    (redis_url,) = [v for v in container["env"] if v["name"] == "SUPERSIM_REDIS_URL"]
    assert redis_url["valueFrom"]["secretKeyRef"]["name"] == NAME
    live_group = config_literals()["SUPERSIM_CONSUMER_GROUP"]
    if workload == "backfill":
        assert env["SUPERSIM_CONSUMER_GROUP"] != live_group
        assert container["args"] == ["run", "--from-start", "--until-caught-up"]
    else:
        assert env["SUPERSIM_CONSUMER_GROUP"] == live_group
        assert container["args"] == ["run"]


def test_probes_use_healthz_and_readyz_on_the_http_port() -> None:
    """Liveness (and start-up) on /healthz, readiness on /readyz, on the SUPERSIM_HTTP_PORT."""
    (container,) = pod_specs()["deployment"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": HTTP_PORT}
    for probe, path in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ]:
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe


def test_deployment_spreads_and_rolls_without_losing_capacity() -> None:
    """Replicas spread over zones and nodes; a rollout starts a replica before stopping one;
    the replica count is left to KEDA."""
    spec = deployment()["spec"]
    assert "replicas" not in spec
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    keys = {c["topologyKey"] for c in spec["template"]["spec"]["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


def test_selectors_pick_the_consumer_replicas_only() -> None:
    """The Service, PodDisruptionBudget, topology spread and ServiceMonitor select the
    Deployment's pods and not the backfill's."""
    consumer = deployment()["spec"]["template"]["metadata"]["labels"]
    backfill_labels = backfill()["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in selector.items())

    service = manifests()[("Service", NAME)]
    selectors = {
        "Deployment": deployment()["spec"]["selector"]["matchLabels"],
        "Service": service["spec"]["selector"],
        "PodDisruptionBudget": manifests()[("PodDisruptionBudget", NAME)]["spec"]["selector"][
            "matchLabels"
        ],
        "ServiceMonitor's Service": manifests()[("ServiceMonitor", NAME)]["spec"]["selector"][
            "matchLabels"
        ],
    }
    for constraint in deployment()["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        selectors["topology spread"] = constraint["labelSelector"]["matchLabels"]
    for what, selector in selectors.items():
        target = service["metadata"]["labels"] if what == "ServiceMonitor's Service" else consumer
        assert selects(selector, target), what
        assert not selects(selector, backfill_labels), what
    (endpoint,) = manifests()[("ServiceMonitor", NAME)]["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_pod_disruption_budget_never_blocks_a_drain() -> None:
    """One replica at a time may be evicted, even a lone one, and unready ones always."""
    spec = manifests()[("PodDisruptionBudget", NAME)]["spec"]
    assert spec == {**spec, "maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    assert "minAvailable" not in spec


def test_service_account_carries_the_irsa_role() -> None:
    """The pods' ServiceAccount names an IAM role for IRSA (a placeholder to replace)."""
    account = manifests()[("ServiceAccount", NAME)]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::(\d{12}|ACCOUNT_ID):role/[\w+=,.@-]+", role), role
    trust = json.loads(render(IAM / "consumer-trust-eks.json"))
    (statement,) = trust["Statement"]
    subject = statement["Condition"]["StringEquals"][f"{PARAMETERS['OidcProvider']}:sub"]
    assert subject == f"system:serviceaccount:{kustomization()['namespace']}:{NAME}"


def test_scaled_object_follows_the_consumed_stream() -> None:
    """KEDA scales the Deployment on the shard count of the stream the worker reads, with at
    least two replicas, through the TriggerAuthentication in the base."""
    spec = manifests()[("ScaledObject", NAME)]["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME}
    assert 2 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "aws-kinesis-stream"
    settings = config_literals()
    assert trigger["metadata"]["streamName"] == settings["SUPERSIM_STREAM_NAME"]
    assert trigger["metadata"]["awsRegion"] == settings["SUPERSIM_REGION"]
    assert ("TriggerAuthentication", trigger["authenticationRef"]["name"]) in manifests()


def test_backfill_job_is_a_template_that_never_runs_by_itself() -> None:
    """`kubectl apply -k` never starts a backfill: the CronJob is suspended, and a
    configuration error (exit 2) or work its last tick left undone (exit 3, which a retry
    from the start of the stream would only redo) fails the Job instead of being retried;
    a pod stopped by an eviction is retried whatever it exited with (the first rule)."""
    spec = backfill()["spec"]
    assert spec["suspend"] is True
    job = spec["jobTemplate"]["spec"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "Ignore"
    assert rules[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    fail_codes = [rule["onExitCodes"]["values"] for rule in rules if rule["action"] == "FailJob"]
    assert [2, 3] in fail_codes


# ---- ECS ---------------------------------------------------------------------------------------


@cache
def task_definition() -> dict[str, Any]:
    return dict(json.loads(render(DEPLOY / "ecs-task-definition.json")))


def test_ecs_task_definition_is_a_valid_register_request() -> None:
    """The task definition, parameters filled, is a valid RegisterTaskDefinition request by the
    ECS API model botocore ships (unknown fields and wrong types refused)."""
    shape = get_session().get_service_model("ecs").operation_model("RegisterTaskDefinition")
    report = ParamValidator().validate(task_definition(), shape.input_shape)
    assert not report.has_errors(), report.generate_report()


def test_ecs_task_has_roles_health_check_and_a_long_stop_timeout() -> None:
    """Execution and task roles, a `supersim-worker health` check, a stop timeout above the
    shutdown bound, non-root and a read-only root, and the production settings."""
    task = task_definition()
    for role in ("executionRoleArn", "taskRoleArn"):
        assert re.fullmatch(rf"arn:aws:iam::{PARAMETERS['AccountId']}:role/[\w+=,.@-]+", task[role])
    assert task["executionRoleArn"] != task["taskRoleArn"]
    (container,) = task["containerDefinitions"]
    assert container["healthCheck"]["command"] == ["CMD", "supersim-worker", "health"]
    env = {var["name"]: var["value"] for var in container["environment"]}
    assert container["stopTimeout"] >= shutdown_bound(dict(env))
    assert container["stopTimeout"] <= 120, "Fargate's maximum"
    assert container["user"] == f"{NON_ROOT_UID}:{NON_ROOT_UID}"
    assert container["readonlyRootFilesystem"] is True
    assert container["linuxParameters"]["capabilities"]["drop"] == ["ALL"]
    assert {m["containerPath"] for m in container["mountPoints"]} == {"/tmp"}
    assert env["SUPERSIM_REQUIRE_NOEVICTION"] == "true"
    assert env["SUPERSIM_HANDLERS"] == "metering,rejections,data_limit,attach_loops"
    assert env["SUPERSIM_HTTP_PORT"] == str(HTTP_PORT)
    assert [s["name"] for s in container["secrets"]] == ["SUPERSIM_REDIS_URL"]
    assert "SUPERSIM_REDIS_URL" not in env


# ---- IAM ---------------------------------------------------------------------------------------


def test_every_iam_document_is_checked() -> None:
    """Each JSON file in deploy/iam/ has its allowed actions listed here."""
    assert {path.name for path in IAM.glob("*.json")} == set(IAM_ACTIONS)


@pytest.mark.parametrize("name", sorted(IAM_ACTIONS))
def test_iam_document_names_exactly_its_actions(name: str) -> None:
    """The document parses, allows (never denies) exactly the actions listed for it, each a
    real API operation, without wildcards, on named resources or principals."""
    actions: set[str] = set()
    for statement in iam_statements(IAM / name):
        assert statement["Effect"] == "Allow"
        assert "NotAction" not in statement
        assert "NotResource" not in statement
        statement_actions = as_list(statement["Action"])
        actions.update(statement_actions)
        if "Principal" in statement:  # a trust policy
            assert "Resource" not in statement
            continue
        for resource in as_list(statement["Resource"]):
            if set(statement_actions) <= ACCOUNT_WIDE_ACTIONS:
                assert resource == "*"
            else:
                assert re.fullmatch(
                    rf"arn:aws:[a-z-]+:{PARAMETERS['Region']}:{PARAMETERS['AccountId']}:\S+",
                    resource,
                ), resource
    assert actions == IAM_ACTIONS[name]
    for action in actions - PERMISSION_ONLY_ACTIONS:
        prefix, _, operation = action.partition(":")
        assert "*" not in action
        model = get_session().get_service_model(IAM_PREFIX_TO_SERVICE[prefix])
        assert operation in model.operation_names, f"{action} is no {prefix} operation"


def test_consumer_policy_covers_every_kinesis_call_of_the_worker() -> None:
    """Every Kinesis operation called in worker/ (but the local development tools) is granted
    by the consumer policy or, for enhanced fan-out, by the fan-out policy."""
    model = get_session().get_service_model("kinesis")
    by_method = {xform(op): op for op in model.operation_names}
    granted = IAM_ACTIONS["consumer-policy.json"] | IAM_ACTIONS["consumer-fanout-policy.json"]
    called: set[str] = set()
    for path in (ROOT / "worker").rglob("*.py"):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(LOCAL_ONLY_SOURCES):
            continue
        for method in re.findall(r"\.([a-z_]+)\(", path.read_text(encoding="utf-8")):
            if method in by_method:
                called.add(f"kinesis:{by_method[method]}")
    assert called, "no Kinesis call found in worker/: has the client moved?"
    assert called <= granted, f"not granted: {sorted(called - granted)}"


def xform(operation: str) -> str:
    """botocore's method name for an operation: ListShards -> list_shards."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower()


def test_publisher_role_requires_the_external_id() -> None:
    """Only the sink's account may assume the publisher role, and only with the external id;
    both are parameters."""
    raw = json.loads((IAM / "publisher-trust.json").read_text(encoding="utf-8"))
    (statement,) = raw["Statement"]
    assert statement["Principal"] == {"AWS": "arn:aws:iam::${PublisherAccountId}:root"}
    assert statement["Action"] == "sts:AssumeRole"
    assert statement["Condition"] == {"StringEquals": {"sts:ExternalId": "${ExternalId}"}}


def test_kms_grants_are_limited_to_the_stream_key_through_kinesis() -> None:
    """kms:Decrypt (consumer) and kms:GenerateDataKey (publisher) are on the stream's key only,
    and only when Kinesis makes the call."""
    for name in ("consumer-policy.json", "publisher-policy.json"):
        (statement,) = [
            s for s in iam_statements(IAM / name) if as_list(s["Action"])[0].startswith("kms:")
        ]
        assert statement["Resource"] == PARAMETERS["KmsKeyArn"]
        assert statement["Condition"] == {
            "StringEquals": {"kms:ViaService": f"kinesis.{PARAMETERS['Region']}.amazonaws.com"}
        }


# ---- parameters ------------------------------------------------------------------------------


def parameterised_files() -> list[Path]:
    return [DEPLOY / "ecs-task-definition.json", *sorted(IAM.glob("*.json"))]


@pytest.mark.parametrize("path", parameterised_files(), ids=lambda path: path.name)
def test_parameters_are_the_documented_ones(path: Path) -> None:
    """Every ${Name} in a JSON file is a parameter that deploy/README.md documents, and the
    file is valid JSON once filled."""
    text = path.read_text(encoding="utf-8")
    names = set(string.Template(text).get_identifiers())
    assert names <= PARAMETERS.keys(), names - PARAMETERS.keys()
    json.loads(render(path))
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for name in names:
        assert f"`${{{name}}}`" in readme, f"${{{name}}} is not documented in deploy/README.md"


def test_render_script_refuses_a_missing_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/render.py fills the parameters, and exits 2 naming a parameter left without one."""
    for name in PARAMETERS:
        monkeypatch.delenv(name, raising=False)
    main = runpy.run_path(str(DEPLOY / "render.py"))["main"]
    path = str(IAM / "publisher-trust.json")
    assert main([path, "PublisherAccountId=210987654321"]) == 2
    assert "ExternalId" in capsys.readouterr().err
    assert main([path, "PublisherAccountId=210987654321", "ExternalId=x"]) == 0
    filled = json.loads(capsys.readouterr().out)
    assert filled["Statement"][0]["Condition"]["StringEquals"]["sts:ExternalId"] == "x"


# ---- the image -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments out."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1] :]


def test_image_is_multi_stage_and_runs_as_non_root() -> None:
    """Two stages at least; the image's user is the fixed non-root uid the manifests expect."""
    froms = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) >= 2
    users = [args for keyword, args in final_stage() if keyword == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    assert users[-1] == f"{NON_ROOT_UID}:{NON_ROOT_UID}"
    assert any(
        keyword == "COPY" and args.startswith("--from=build") for keyword, args in final_stage()
    )


def test_image_has_a_health_check_and_stops_on_sigterm() -> None:
    """HEALTHCHECK runs `supersim-worker health`; SIGTERM stops it; the entry point is exec form,
    so the worker receives the signal itself."""
    (healthcheck,) = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    command = healthcheck[healthcheck.index("CMD ") + len("CMD ") :]
    assert json.loads(command) == ["supersim-worker", "health"]
    instructions = dict(final_stage())
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(instructions["ENTRYPOINT"]) == ["supersim-worker"]
    assert "PYTHONDONTWRITEBYTECODE=1" in instructions["ENV"]
    assert f"SUPERSIM_HTTP_PORT={HTTP_PORT}" in instructions["ENV"]
    assert instructions["ARG"] == f"VERSION={pyproject()['project']['version']}"


def test_image_installs_the_pinned_set_without_resolving() -> None:
    """Dependencies come from deploy/constraints.txt with --no-deps, the project wheel too, and
    `pip check` verifies the set; build and run use the Python the pins were made on."""
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    assert "--no-deps --requirement /tmp/lock/constraints.txt" in runs
    assert "--no-deps /tmp/wheels/supersim_worker-" in runs
    assert "pip check" in runs
    first_arg = next(args for keyword, args in dockerfile_instructions() if keyword == "ARG")
    assert first_arg == f"PYTHON_VERSION={constraints_python()}"


def test_dockerignore_lets_through_what_the_image_copies() -> None:
    """Every path the Dockerfile copies from the build context is allowed by
    deploy/Dockerfile.dockerignore, which ignores everything else."""
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _destination = args.split()
            for source in sources:
                assert source.rstrip("/") in allowed, f"COPY {source} is ignored"


# ---- pinned dependencies ---------------------------------------------------------------------


def read_pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line.strip())
        assert match, f"{path.name}: not NAME==VERSION: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def constraints_python() -> str:
    text = (DEPLOY / "constraints.txt").read_text(encoding="utf-8")
    match = re.search(r"^# python-version: (\d+\.\d+)$", text, re.MULTILINE)
    assert match, "constraints.txt does not say which Python it was made on"
    return match[1]


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def test_constraints_pin_every_runtime_dependency_within_pyproject() -> None:
    """Each runtime dependency of pyproject.toml (and the extras it asks for) is pinned in
    deploy/constraints.txt at a version its specifier allows; no development tool is."""
    pins = read_pins(DEPLOY / "constraints.txt")
    for line in pyproject()["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned: run deploy/lock.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside {requirement.specifier}: run deploy/lock.py"
        )
    assert "hiredis" in pins, "redis[hiredis]'s extra"
    assert not pins.keys() & DEV_ONLY
    python = tuple(int(part) for part in constraints_python().split("."))
    assert Requirement(f"x{pyproject()['project']['requires-python']}").specifier.contains(
        ".".join(map(str, python))
    )


def test_build_constraints_satisfy_the_build_system() -> None:
    """The image's wheel is built with pinned versions of what [build-system] requires."""
    pins = read_pins(DEPLOY / "build-constraints.txt")
    for line in pyproject()["build-system"]["requires"]:
        requirement = Requirement(line)
        version = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version), f"{requirement.name}=={version}"
    # pyproject's `license = "..."` string (PEP 639) needs setuptools 77 or later.
    assert int(pins["setuptools"].split(".")[0]) >= 77


# ---- the guide -------------------------------------------------------------------------------


def test_deploy_readme_names_every_file() -> None:
    """deploy/README.md mentions every file in deploy/, so none is left unexplained."""
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != "README.md" and "__pycache__" not in path.parts:
            assert path.name in readme, f"deploy/README.md does not mention {path.name}"
