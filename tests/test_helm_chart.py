"""The Helm chart, rendered offline by the real Helm engine (helm-python-sdk).

Rendered objects are validated against the Kubernetes 1.30 OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail). The Prometheus Operator CRDs have no
bundled schema, so their fields are asserted directly.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.connection import parse_url

from imageshare_server.config import Settings, env_name, parse_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "imageshare"
PRODUCTION = ROOT / "helm" / "values-production.yaml"
KUBE_VERSION = "1.30.0"
NAME, NAMESPACE = "demo", "shares"
FULLNAME = f"{NAME}-imageshare"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
RRSA_TOKEN_DIR = "/var/run/secrets/ack.alibabacloud.com/rrsa-tokens"
REDIS_CA_DIR = "/etc/imageshare/redis-ca"
REDIS_CA_URL = f"rediss://:pw@redis.example:6380/0?ssl_ca_certs={REDIS_CA_DIR}/ca.crt"
REDIS_SETTINGS = {
    "IMAGESHARE_REDIS_TIMEOUT",
    "IMAGESHARE_REDIS_LEASE_TTL",
    "IMAGESHARE_REDIS_KEY_PREFIX",
    "IMAGESHARE_RATE_LIMIT_ACCOUNT",
}
# Chart defaults that differ from the server's on purpose: the listeners bind the pod's
# ports on every interface, upstreamQps is per pod without Redis (2 pods x 10 = the
# server's 20, see values.yaml) and maxConcurrentRpcs fits the pod's CPU limit.
DELIBERATE_DIFFERENCES = {"listen", "metrics_listen", "upstream_qps", "max_concurrent_rpcs"}

ACCESS_KEY = {"credentials": {"accessKeyId": "LTAI-test-id", "accessKeySecret": "test-secret"}}
EXPLICIT_RRSA = {
    "rrsa": {
        "enabled": True,
        "roleArn": "acs:ram::1234567890123456:role/imageshare",
        "oidcProviderArn": "acs:ram::1234567890123456:oidc-provider/ack-rrsa-c0ffee",
        "stsRegion": "cn-hangzhou",
        "vpcEndpoint": True,
    }
}

Objects = dict[tuple[str, str], dict[str, Any]]


def production_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION.read_text())
    return values


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render_raw(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    rendered: dict[str, str] = chart.render(values, name=NAME, namespace=NAMESPACE)
    return rendered


def render(chart: helm.Chart, values: dict[str, Any]) -> Objects:
    objects: Objects = {}
    for path, text in render_raw(chart, values).items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objects, f"duplicate object {key}"
                objects[key] = doc
    return objects


def deployment(objects: Objects) -> dict[str, Any]:
    return objects[("Deployment", FULLNAME)]


def server_container(objects: Objects) -> dict[str, Any]:
    pod = deployment(objects)["spec"]["template"]["spec"]
    container: dict[str, Any] = next(c for c in pod["containers"] if c["name"] == "server")
    return container


def of_kind(objects: Objects, kind: str) -> list[dict[str, Any]]:
    return [obj for (k, _), obj in objects.items() if k == kind]


def env_names(container: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


CASES = {
    "defaults": {},
    "production": production_values(),
    "access-key": ACCESS_KEY,
    "explicit-rrsa": EXPLICIT_RRSA,
    "exec-prestop-emulator": {
        "lifecycle": {"preStopMode": "exec"},
        "config": {"emulator": True},
        "redis": {"url": "redis://:pw@redis:6379/0"},
        "podAntiAffinityPreset": "none",
        "topologySpread": {"enabled": False},
    },
    "redis-private-ca": {
        "redis": {"url": REDIS_CA_URL, "caSecret": "redis-ca", "rateLimitAccount": "acct"}
    },
}


def config_data(objects: Objects) -> dict[str, str]:
    data: dict[str, str] = objects[("ConfigMap", FULLNAME)]["data"]
    return data


def server_settings(objects: Objects, redis_url: str = "") -> Settings:
    """What the real server's parser makes of the rendered ConfigMap (plus the Secret's URL)."""
    env = dict(config_data(objects))
    if redis_url:
        env["IMAGESHARE_REDIS_URL"] = redis_url
    return parse_settings([], env)


def differences(settings: Settings) -> dict[str, Any]:
    defaults = dataclasses.asdict(Settings())
    return {k: v for k, v in dataclasses.asdict(settings).items() if v != defaults[k]}


@pytest.mark.parametrize("case", ["defaults", "production"])
def test_lint_strict_is_clean(case: str) -> None:
    report = helm.lint(CHART, CASES[case], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_object_is_valid_for_kubernetes_1_30(chart: helm.Chart, case: str) -> None:
    objects = render(chart, CASES[case])
    assert ("Deployment", FULLNAME) in objects
    for (kind, name), obj in objects.items():
        assert obj["metadata"]["namespace"] == NAMESPACE, (kind, name)
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == NAME
        # The helm test pod is named apart so no server selector picks it.
        assert labels["app.kubernetes.io/name"] == (
            "imageshare-test" if kind == "Pod" else "imageshare"
        )
        assert labels["helm.sh/chart"].startswith("imageshare-")
        if kind in CRD_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_default_probes_are_native_grpc_on_the_numeric_port(chart: helm.Chart) -> None:
    container = server_container(render(chart, {}))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert set(spec) & {"httpGet", "tcpSocket", "exec"} == set()
        assert spec["grpc"] == {"port": 50051, "service": ""}
        assert type(spec["grpc"]["port"]) is int
    # Startup may take a while; readiness reacts faster than liveness.
    assert container["startupProbe"]["failureThreshold"] * 2 >= 60
    assert (
        container["readinessProbe"]["periodSeconds"] < container["livenessProbe"]["periodSeconds"]
    )


def test_tls_moves_probes_to_the_plaintext_health_port(chart: helm.Chart) -> None:
    """Kubelet gRPC probes cannot speak TLS: with TLS they target the health-only port."""
    objects = render(chart, production_values())
    container = server_container(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50052, "service": ""}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464, "health": 50052}
    config = objects[("ConfigMap", FULLNAME)]["data"]
    assert config["IMAGESHARE_HEALTH_LISTEN"] == "0.0.0.0:50052"
    assert config["IMAGESHARE_TLS_CERT"] == "/etc/imageshare/tls/tls.crt"
    assert config["IMAGESHARE_TLS_KEY"] == "/etc/imageshare/tls/tls.key"
    assert config["IMAGESHARE_TLS_CLIENT_CA"] == "/etc/imageshare/tls/ca.crt"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/imageshare/tls", "readOnly": True}
    volumes = {v["name"]: v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "imageshare-tls"


@pytest.mark.parametrize("case", ["defaults", "production"])
def test_pod_and_container_are_hardened(chart: helm.Chart, case: str) -> None:
    objects = render(chart, CASES[case])
    pod = deployment(objects)["spec"]["template"]["spec"]
    container = server_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # Service links for a Service named "imageshare" would inject IMAGESHARE_PORT & co.
    assert pod["enableServiceLinks"] is False
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert type(sc["runAsUser"]) is int
    assert sc["runAsUser"] > 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "sizeLimit" in tmp["emptyDir"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    resources = container["resources"]
    assert set(resources) == {"requests", "limits"}
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_ports_and_service(chart: helm.Chart) -> None:
    objects = render(chart, {})
    container = server_container(objects)
    assert container["ports"] == [
        {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9464, "protocol": "TCP"},
    ]
    config = objects[("ConfigMap", FULLNAME)]["data"]
    assert config["IMAGESHARE_LISTEN"] == "0.0.0.0:50051"
    assert config["IMAGESHARE_METRICS_LISTEN"] == "0.0.0.0:9464"
    assert {"configMapRef": {"name": FULLNAME}} in container["envFrom"]
    service = objects[("Service", FULLNAME)]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["grpc"]["port"] == 50051
    assert ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["targetPort"] == "metrics"
    pod_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment(objects)["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_headless_service_for_client_side_balancing(chart: helm.Chart) -> None:
    objects = render(chart, {})
    headless = objects[("Service", f"{FULLNAME}-headless")]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == objects[("Service", FULLNAME)]["spec"]["selector"]
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert headless["spec"]["ports"][0]["appProtocol"] == "grpc"
    assert ("Service", f"{FULLNAME}-headless") not in render(
        chart, {"service": {"headless": False}}
    )
    config = objects[("ConfigMap", FULLNAME)]["data"]
    assert config["IMAGESHARE_MAX_CONNECTION_AGE"] == "300"  # what makes callers rebalance


def test_helm_test_pod_is_not_selected_as_a_server_pod(chart: helm.Chart) -> None:
    for values in ({}, production_values()):
        objects = render(chart, values)
        test_pod = objects[("Pod", f"{FULLNAME}-test-health")]["metadata"]["labels"]
        selectors = [
            deployment(objects)["spec"]["selector"]["matchLabels"],
            *(svc["spec"]["selector"] for svc in of_kind(objects, "Service")),
            *(
                pdb["spec"]["selector"]["matchLabels"]
                for pdb in of_kind(objects, "PodDisruptionBudget")
            ),
        ]
        assert len(selectors) >= 3
        for selector in selectors:
            assert not selector.items() <= test_pod.items(), selector


def test_config_map_sets_only_settings_the_server_knows(chart: helm.Chart) -> None:
    """A renamed or missing server setting must not be silently ignored in production."""
    table = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "imageshare-server"), "--print-config-table"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    known = set(re.findall(r"`(IMAGESHARE_[A-Z0-9_]+)`", table))
    assert "IMAGESHARE_LISTEN" in known
    for case in ("defaults", "production"):
        objects = render(chart, CASES[case])
        chart_settings = set(objects[("ConfigMap", FULLNAME)]["data"])
        chart_settings |= {n for n in env_names(server_container(objects)) if "IMAGESHARE" in n}
        assert chart_settings - known == set(), case


def test_chart_covers_every_server_setting(chart: helm.Chart) -> None:
    """A setting the server gains must reach values.yaml, or operators cannot tune it."""
    known = {env_name(f.name) for f in dataclasses.fields(Settings)}
    covered: set[str] = set()
    for case in ("defaults", "production"):
        objects = render(chart, CASES[case])
        covered |= set(config_data(objects)) | env_names(server_container(objects))
    assert known - covered == set()


def test_defaults_render_the_servers_defaults(chart: helm.Chart) -> None:
    objects = render(chart, {})
    data = config_data(objects)
    # Integers must not render as floats ("6.7108864e+07"): the server's int() rejects them.
    assert data["IMAGESHARE_CACHE_MAX_BYTES"] == "67108864"
    assert data["IMAGESHARE_CACHE_MAX_ENTRIES"] == "10000"
    assert data["IMAGESHARE_RETRY_BUDGET_RATIO"] == "1"
    assert data["IMAGESHARE_RETRY_BUDGET_TOKENS"] == "20"
    assert REDIS_SETTINGS & set(data) == set()
    settings = server_settings(objects)
    assert set(differences(settings)) == DELIBERATE_DIFFERENCES
    assert (settings.upstream_qps, settings.max_concurrent_rpcs) == (10, 100)
    assert (settings.listen, settings.metrics_listen) == ("0.0.0.0:50051", "0.0.0.0:9464")

    # With Redis configured and nothing else set, its knobs are the server's defaults too.
    with_redis = render(chart, {"redis": {"url": "redis://redis:6379/0"}})
    assert set(config_data(with_redis)) >= REDIS_SETTINGS
    changed = differences(server_settings(with_redis, "redis://redis:6379/0"))
    assert set(changed) == DELIBERATE_DIFFERENCES | {"redis_url"}


def test_every_tuning_value_reaches_the_server(chart: helm.Chart) -> None:
    tuned = {
        "config": {
            "cacheStaleWhileRevalidateSeconds": 45,
            "cacheStaleIfErrorSeconds": 1800,
            "cacheNegativeTtlSeconds": 0,
            "cacheMaxEntries": 50000,
            "cacheMaxBytes": 268435456,
            "upstreamQps": 0,
            "upstreamBurst": 5,
            "upstreamParallelPages": 4,
            "upstreamMaxInFlight": 16,
            "retryBudgetTokens": 30,
            "retryBudgetRatio": 0.25,
            "upstreamMaxAttempts": 5,
            "upstreamPageSize": 50,
            "connectTimeoutSeconds": 2.5,
            "readTimeoutSeconds": 30,
        },
        "redis": {
            "url": "redis://redis:6379/1",
            "timeoutSeconds": 0.5,
            "leaseTtlSeconds": 8,
            "keyPrefix": "shares-b:",
            "rateLimitAccount": "acct-b",
        },
    }
    settings = server_settings(render(chart, tuned), "redis://redis:6379/1")
    assert differences(settings) == {
        "listen": "0.0.0.0:50051",
        "metrics_listen": "0.0.0.0:9464",
        "max_concurrent_rpcs": 100,
        "cache_stale_while_revalidate": 45,
        "cache_stale_if_error": 1800,
        "cache_negative_ttl": 0,
        "cache_max_entries": 50000,
        "cache_max_bytes": 268435456,
        "upstream_qps": 0,
        "upstream_burst": 5,
        "upstream_parallel_pages": 4,
        "upstream_max_in_flight": 16,
        "retry_budget_tokens": 30,
        "retry_budget_ratio": 0.25,
        "upstream_max_attempts": 5,
        "upstream_page_size": 50,
        "connect_timeout": 2.5,
        "read_timeout": 30,
        "redis_url": "redis://redis:6379/1",
        "redis_timeout": 0.5,
        "redis_lease_ttl": 8,
        "redis_key_prefix": "shares-b:",
        "rate_limit_account": "acct-b",
    }


def test_production_redis_knobs_and_private_ca(chart: helm.Chart) -> None:
    values = production_values()
    objects = render(chart, values)
    container = server_container(objects)
    (url_env,) = [e for e in container["env"] if e["name"] == "IMAGESHARE_REDIS_URL"]
    assert url_env["valueFrom"]["secretKeyRef"] == {"name": "imageshare-redis", "key": "url"}
    data = config_data(objects)
    assert data["IMAGESHARE_REDIS_TIMEOUT"] == "0.25"
    assert data["IMAGESHARE_REDIS_LEASE_TTL"] == "5"
    assert data["IMAGESHARE_REDIS_KEY_PREFIX"] == values["redis"]["keyPrefix"]
    assert data["IMAGESHARE_RATE_LIMIT_ACCOUNT"] == values["redis"]["rateLimitAccount"]
    assert data["IMAGESHARE_UPSTREAM_QPS"] == "20"

    mount = next(m for m in container["volumeMounts"] if m["name"] == "redis-ca")
    assert mount == {"name": "redis-ca", "mountPath": REDIS_CA_DIR, "readOnly": True}
    pod = deployment(objects)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "redis-ca")
    assert volume["secret"]["secretName"] == "imageshare-redis-ca"
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    # The URL the notes ask for makes redis-py trust exactly the mounted file.
    notes = render_raw(chart, values)["imageshare/templates/NOTES.txt"]
    assert f"?ssl_ca_certs={REDIS_CA_DIR}/ca.crt" in notes
    client_options = parse_url(REDIS_CA_URL)  # type: ignore[no-untyped-call]  # redis-py
    assert client_options["ssl_ca_certs"] == f"{mount['mountPath']}/ca.crt"
    settings = server_settings(objects, REDIS_CA_URL)
    assert settings.redis_key_prefix == "imageshare-prod:"
    assert settings.rate_limit_account == "platform-prod"

    defaults = render(chart, {})
    assert "redis-ca" not in {
        v["name"] for v in deployment(defaults)["spec"]["template"]["spec"]["volumes"]
    }
    assert "Redis URL" not in render_raw(chart, {})["imageshare/templates/NOTES.txt"]


def test_checksum_annotation_rolls_pods_on_config_change(chart: helm.Chart) -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        result: dict[str, str] = deployment(render(chart, values))["spec"]["template"]["metadata"][
            "annotations"
        ]
        return result

    base = annotations({})
    assert re.fullmatch(r"[0-9a-f]{64}", base["checksum/config"])
    assert annotations({}) == base
    assert (
        annotations({"config": {"logLevel": "debug"}})["checksum/config"]
        != (base["checksum/config"])
    )
    rotated = {"credentials": {"accessKeyId": "LTAI-test-id", "accessKeySecret": "rotated"}}
    assert annotations(rotated)["checksum/secret"] != annotations(ACCESS_KEY)["checksum/secret"]


def test_access_key_secret_only_when_nothing_better_is_configured(chart: helm.Chart) -> None:
    objects = render(chart, ACCESS_KEY)
    secret = objects[("Secret", f"{FULLNAME}-credentials")]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAI-test-id",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "test-secret",
    }
    container = server_container(objects)
    assert {"secretRef": {"name": f"{FULLNAME}-credentials"}} in container["envFrom"]
    # The secret value lives only in the Secret, never in the pod spec or ConfigMap.
    assert "test-secret" not in json.dumps(deployment(objects))
    assert "test-secret" not in json.dumps(objects[("ConfigMap", FULLNAME)])

    for values in ({}, EXPLICIT_RRSA, production_values()):
        assert of_kind(render(chart, values), "Secret") == []

    existing = render(chart, {"credentials": {"existingSecret": "ops-ak"}})
    assert of_kind(existing, "Secret") == []
    assert {"secretRef": {"name": "ops-ak"}} in server_container(existing)["envFrom"]


def test_rrsa_through_the_ack_webhook(chart: helm.Chart) -> None:
    objects = render(chart, production_values())
    account = objects[("ServiceAccount", FULLNAME)]
    assert account["metadata"]["annotations"] == {
        "pod-identity.alibabacloud.com/role-name": "imageshare-ecs-readonly"
    }
    pod = deployment(objects)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    # The webhook injects the variables and the token; the chart must not duplicate them.
    assert not any(n.startswith("ALIBABA_CLOUD_") for n in env_names(server_container(objects)))
    assert "rrsa-token" not in {v["name"] for v in pod["volumes"]}
    # Without the namespace label the webhook injects nothing: the notes must say so.
    notes = render_raw(chart, production_values())["imageshare/templates/NOTES.txt"]
    assert f"kubectl label namespace {NAMESPACE} pod-identity.alibabacloud.com/injection=on" in (
        notes
    )


def test_rrsa_wired_explicitly_without_the_webhook(chart: helm.Chart) -> None:
    objects = render(chart, EXPLICIT_RRSA)
    container = server_container(objects)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ALIBABA_CLOUD_ROLE_ARN"] == EXPLICIT_RRSA["rrsa"]["roleArn"]
    assert env["ALIBABA_CLOUD_OIDC_PROVIDER_ARN"] == EXPLICIT_RRSA["rrsa"]["oidcProviderArn"]
    assert env["ALIBABA_CLOUD_OIDC_TOKEN_FILE"] == f"{RRSA_TOKEN_DIR}/token"
    assert env["ALIBABA_CLOUD_STS_REGION"] == "cn-hangzhou"
    assert env["ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED"] == "true"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "rrsa-token")
    assert mount["mountPath"] == RRSA_TOKEN_DIR
    assert mount["readOnly"] is True
    pod = deployment(objects)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "rrsa-token")
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"] == {
        "path": "token",
        "audience": "sts.aliyuncs.com",
        "expirationSeconds": 3600,
    }
    assert "annotations" not in objects[("ServiceAccount", FULLNAME)]["metadata"]


def test_graceful_drain_timing(chart: helm.Chart) -> None:
    for case in ("defaults", "production"):
        values = chart.merge_values(CASES[case])
        objects = render(chart, CASES[case])
        pod = deployment(objects)["spec"]["template"]["spec"]
        pre_stop = server_container(objects)["lifecycle"]["preStop"]
        assert pre_stop == {"sleep": {"seconds": values["lifecycle"]["preStopSleepSeconds"]}}
        drain = values["config"]["gracePeriodSeconds"]
        config = objects[("ConfigMap", FULLNAME)]["data"]
        assert config["IMAGESHARE_GRACE_PERIOD"] == str(drain)
        assert pod["terminationGracePeriodSeconds"] > pre_stop["sleep"]["seconds"] + drain

    exec_mode = server_container(render(chart, CASES["exec-prestop-emulator"]))
    assert exec_mode["lifecycle"]["preStop"] == {"exec": {"command": ["/bin/sleep", "5"]}}
    explicit = server_container(render(chart, {"lifecycle": {"preStopMode": "sleep"}}))
    assert explicit["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}


def test_production_scaling_and_disruption(chart: helm.Chart) -> None:
    objects = render(chart, production_values())
    assert "replicas" not in deployment(objects)["spec"]
    hpa = objects[("HorizontalPodAutoscaler", FULLNAME)]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    targets = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"]}
    assert targets["cpu"] == {"type": "Utilization", "averageUtilization": 65}
    assert targets["memory"] == {"type": "Utilization", "averageUtilization": 80}
    pdb = objects[("PodDisruptionBudget", FULLNAME)]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    affinity = deployment(objects)["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in affinity

    default = render(chart, {})
    assert deployment(default)["spec"]["replicas"] == 2
    assert of_kind(default, "HorizontalPodAutoscaler") == []
    assert of_kind(default, "NetworkPolicy") == []
    assert (
        objects[("PodDisruptionBudget", FULLNAME)]["spec"]["selector"]["matchLabels"]
        == (deployment(default)["spec"]["selector"]["matchLabels"])
    )


def test_production_network_policy(chart: helm.Chart) -> None:
    policy = render(chart, production_values())[("NetworkPolicy", FULLNAME)]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    grpc_rule, metrics_rule = policy["ingress"]
    assert grpc_rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
    assert {"podSelector": {"matchLabels": {f"{FULLNAME}-client": "true"}}} in grpc_rule["from"]
    assert {
        "namespaceSelector": {"matchLabels": {"imageshare.example.com/client": "true"}}
    } in grpc_rule["from"]
    assert metrics_rule["ports"] == [{"port": 9464, "protocol": "TCP"}]
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6379, "TCP")}


def test_monitoring_objects_and_labels(chart: helm.Chart) -> None:
    objects = render(chart, production_values())
    monitor = objects[("ServiceMonitor", FULLNAME)]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    service = objects[("Service", FULLNAME)]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    (rule,) = of_kind(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"]["groups"], "PrometheusRule without rule groups"

    dashboards = objects[("ConfigMap", f"{FULLNAME}-dashboards")]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert dashboards["metadata"]["annotations"] == {"grafana_folder": "Platform"}
    shipped = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert shipped
    assert sorted(dashboards["data"]) == shipped
    assert sum(len(v.encode()) for v in dashboards["data"].values()) < 1024 * 1024

    defaults = render(chart, {})
    for kind in CRD_KINDS:
        assert of_kind(defaults, kind) == []
    assert ("ConfigMap", f"{FULLNAME}-dashboards") not in defaults


def test_dashboard_config_map_ships_every_dashboard(tmp_path: Path) -> None:
    """Uses a copy of the chart so the assertion does not depend on which dashboards exist."""
    copy = tmp_path / "imageshare"
    shutil.copytree(CHART, copy)
    dashboards = copy / "dashboards"
    dashboards.mkdir(exist_ok=True)
    (dashboards / "zz-test.json").write_text('{"title": "test dashboard"}\n')
    (dashboards / "notes.txt").write_text("not a dashboard\n")
    expected = sorted(p.name for p in dashboards.glob("*.json"))
    values = {"grafanaDashboard": {"enabled": True, "labels": {"release": "kps"}}}
    with helm.Chart.load(copy) as copied:
        objects = render(copied, values)
        assert of_kind(render(copied, {}), "ConfigMap") == [objects[("ConfigMap", FULLNAME)]]
    config_map = objects[("ConfigMap", f"{FULLNAME}-dashboards")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["labels"]["release"] == "kps"
    assert sorted(config_map["data"]) == expected
    assert json.loads(config_map["data"]["zz-test.json"]) == {"title": "test dashboard"}
    for name in expected:
        json.loads(config_map["data"][name])


@pytest.mark.parametrize(
    "values",
    [
        {"unknownKey": 1},
        {"image": {"tagg": "1.0"}},
        {"config": {"signatureVersion": "v2"}},
        {"config": {"logLevel": "verbose"}},
        {"config": {"cacheTtlSeconds": -1}},
        {"containerPorts": {"grpc": 70000}},
        {"containerPorts": {"grpc": "grpc"}},
        {"service": {"type": "ExternalName"}},
        {"rrsa": {"roleArn": "arn:aws:iam::1:role/x"}},
        {"redis": {"url": "http://redis:6379"}},
        {"serviceMonitor": {"interval": "soon"}},
        {"prometheusRule": {"errorRatioThreshold": 5}},
        {"prometheusRule": {"rules": []}},
        {"lifecycle": {"preStopMode": "signal"}},
        {"podDisruptionBudget": {"minAvailable": "half"}},
        {"replicaCount": "2"},
        {"config": {"retryBudgetRatio": -0.1}},
        {"config": {"cacheMaxEntries": "10000"}},
        {"config": {"cacheMaxBytes": 1.5}},
        {"config": {"cacheStaleIfErrorSeconds": -1}},
        {"config": {"upstreamPageSize": 101}},
        {"config": {"upstreamMaxAttempts": 0}},
        {"config": {"upstreamBurst": 0}},
        {"config": {"readTimeoutSeconds": 0}},
        {"config": {"upstreamQps": -1}},
        {"redis": {"timeoutSeconds": 0}},
        {"redis": {"leaseTtlSeconds": "5s"}},
        {"redis": {"keyPrefix": 7}},
        {"redis": {"caSecret": "Redis_CA"}},
    ],
    ids=repr,
)
def test_schema_rejects_unknown_and_invalid_values(
    chart: helm.Chart, values: dict[str, Any]
) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        render_raw(chart, values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rrsa": {"enabled": True}}, "rrsa.enabled needs"),
        ({"rrsa": {"enabled": True, "roleName": "r"}, **ACCESS_KEY}, "mutually exclusive"),
        ({"credentials": {"accessKeyId": "LTAI-only-id"}}, "accessKeySecret"),
        ({"tls": {"enabled": True}}, "tls.secretName"),
        ({"terminationGracePeriodSeconds": 25}, "must exceed"),
        ({"redis": {"caSecret": "redis-ca"}}, "redis.caSecret needs redis.url"),
        (
            {"redis": {"url": "rediss://redis:6380/0", "caSecret": "redis-ca"}},
            f"?ssl_ca_certs={REDIS_CA_DIR}/ca.crt",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    chart.validate_schema(values)
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render_raw(chart, values)


def _leaf_paths(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_paths(value, (*prefix, key))
    else:
        yield prefix


def test_schema_describes_every_default_value(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None
    assert schema["additionalProperties"] is False
    for path in _leaf_paths(chart.values):
        node = schema
        for key in path:
            if "properties" not in node:
                break  # a free-form Kubernetes object (affinity, securityContext, ...)
            assert key in node["properties"], f"{'.'.join(path)} missing from the schema"
            node = node["properties"][key]
            assert "description" in node or "type" in node or "oneOf" in node, path


def test_every_value_is_documented_in_values_yaml() -> None:
    """Each leaf has a `# --` comment on itself or on an enclosing key."""
    documented: dict[tuple[str, ...], bool] = {}
    stack: list[tuple[int, str]] = []
    comment_block: list[str] = []
    key_line = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        match = key_line.match(line)
        if not match:
            if not stripped:
                comment_block = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        path = tuple(k for _, k in stack)
        own = bool(comment_block) and comment_block[0].startswith("# --")
        documented[path] = own or any(documented.get(path[:i], False) for i in range(len(path)))
        comment_block = []
    assert len(documented) > 50
    leaves = {p for p in documented if not any(q[: len(p)] == p and q != p for q in documented)}
    assert sorted(".".join(p) for p in leaves if not documented[p]) == []


class _Health:
    """A real grpc.health.v1 server on 127.0.0.1 for the helm test pod's script."""

    def __init__(self) -> None:
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def set(self, status: int) -> None:
        self.servicer.set("", status)


@pytest.fixture
def health_server() -> Iterator[_Health]:
    server = _Health()
    yield server
    server.server.stop(0).wait()


def test_helm_test_pod_checks_grpc_health(chart: helm.Chart, health_server: _Health) -> None:
    objects = render(chart, {})
    pod = objects[("Pod", f"{FULLNAME}-test-health")]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["metadata"]["labels"][f"{FULLNAME}-client"] == "true"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == server_container(objects)["image"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["args"][0] == f"{FULLNAME}.{NAMESPACE}.svc:50051"
    command = container["command"]
    assert command[:2] == ["python", "-c"]

    # Run the pod's exact script against a real health server on loopback.
    args = [f"127.0.0.1:{health_server.port}", *container["args"][1:]]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", command[2], *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )

    health_server.set(health_pb2.HealthCheckResponse.SERVING)
    serving = run()
    assert serving.returncode == 0, serving.stderr
    assert "SERVING" in serving.stdout
    health_server.set(health_pb2.HealthCheckResponse.NOT_SERVING)
    draining = run()
    assert draining.returncode == 1, draining.stderr
    assert "NOT_SERVING" in draining.stdout


def test_production_test_pod_uses_tls(chart: helm.Chart) -> None:
    pod = render(chart, production_values())[("Pod", f"{FULLNAME}-test-health")]
    (container,) = pod["spec"]["containers"]
    assert container["args"][2:] == ["true", f"{FULLNAME}.{NAMESPACE}.svc"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert mount["mountPath"] == "/etc/imageshare/tls"
