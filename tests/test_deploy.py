"""The deployment files: the Helm chart, docker-compose.yml, the image, alerts.

The chart is rendered with ``helm`` (built by ``make deploy-check`` into
``.cache/bin``, or ``$HELM``) in several configurations and every rendered
object is validated against the Kubernetes JSON schemas that the
kubernetes-validate package bundles; the ServiceMonitor (a CRD) is checked
by structure. The Compose file is validated against the Compose
specification's schema (check-jsonschema's vendored copy). No cluster and no
Docker engine are needed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pushstream import metrics
from pushstream.config import Settings
from pushstream.worker import STOP_MARGIN_S

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "pushstream"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
TIMEOUT_S = 60

Objects = list[dict[str, Any]]

# Values that turn on everything the chart can render.
EVERYTHING = [
    "storage.mode=deployment",
    "serviceMonitor.enabled=true",
    "replicas=6",
    "kafka.securityProtocol=SASL_SSL",
    "kafka.sasl.mechanism=SCRAM-SHA-512",
    "kafka.sasl.username=pushstream",
    "kafka.sasl.passwordSecret.name=kafka-user",
    "kafka.tls.secretName=kafka-ca",
    "credentials.files.AuthKey_ABCDE12345\\.p8=not-a-real-key",
    "credentials.files.fcm\\.json={}",
    "providers.apns[0].bundle_id=com.example.app",
    "providers.apns[0].key_id=ABCDE12345",
    "providers.apns[0].team_id=TEAM123456",
    "providers.apns[0].key_file=AuthKey_ABCDE12345.p8",
    "providers.fcm[0].project_id=example-prod",
    "providers.fcm[0].service_account_file=fcm.json",
    "config.extra.MAX_IN_FLIGHT=2000",
    "config.extra.ENDPOINTS__CA_FILE=/etc/pushstream/credentials/ca.pem",
]
CONFIGURATIONS = {
    "defaults": [],
    "service monitor off, statefulset": ["serviceMonitor.enabled=false"],
    "everything on, deployment": EVERYTHING,
}


def helm_binary() -> str:
    """helm from $HELM, .cache/bin (make deploy-check) or PATH."""
    for candidate in (os.environ.get("HELM"), str(ROOT / ".cache" / "bin" / "helm")):
        if candidate and Path(candidate).is_file():
            return candidate
    found = shutil.which("helm")
    if found is None:
        pytest.fail("helm not found: `make deploy-check` builds it into .cache/bin")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [helm_binary(), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def _sets(values: Iterable[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


@cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    """The objects the chart renders in one configuration."""
    out = helm("template", "ps", str(CHART), *_sets(CONFIGURATIONS[name])).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def of_kind(objects: Iterable[dict[str, Any]], kind: str) -> Objects:
    return [o for o in objects if o["kind"] == kind]


def one(objects: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def workload(objects: Iterable[dict[str, Any]]) -> dict[str, Any]:
    found = of_kind(objects, "StatefulSet") + of_kind(objects, "Deployment")
    assert len(found) == 1
    return found[0]


def worker_container(objects: Iterable[dict[str, Any]]) -> dict[str, Any]:
    pod = workload(objects)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


# --- the chart -----------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_chart_lints(name: str) -> None:
    """A chart that helm lint rejects would not install."""
    result = helm("lint", "--strict", str(CHART), *_sets(CONFIGURATIONS[name]))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", CONFIGURATIONS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_match_the_kubernetes_schemas(name: str, version: str) -> None:
    """The API server would refuse a manifest with a wrong field or type."""
    objects = render(name)
    core = [o for o in objects if o["kind"] != "ServiceMonitor"]
    assert {o["kind"] for o in core} >= {"ConfigMap", "Service", "Job"}
    for obj in core:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.message}")


def test_the_validator_rejects_a_broken_object() -> None:
    """A schema check that accepts anything would let broken charts through."""
    pod = workload(render("defaults"))
    broken = {**pod, "spec": {**pod["spec"], "replicas": "three"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_service_monitor_scrapes_the_metrics_service() -> None:
    """Prometheus Operator would find no target, or every pod twice."""
    objects = render("everything on, deployment")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    selected = [
        s
        for s in of_kind(objects, "Service")
        if wanted <= s["metadata"]["labels"].items()
    ]
    assert len(selected) == 1
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["port"] in ports
    assert not of_kind(render("service monitor off, statefulset"), "ServiceMonitor")


def test_statefulset_keeps_tables_on_a_volume_deployment_on_empty_dir() -> None:
    """The storage mode decides whether a restart replays the whole changelog."""
    stateful = workload(render("defaults"))
    assert stateful["kind"] == "StatefulSet"
    (claim,) = stateful["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    headless = [
        s
        for s in of_kind(render("defaults"), "Service")
        if s["spec"].get("clusterIP") == "None"
    ]
    assert [s["metadata"]["name"] for s in headless] == [
        stateful["spec"]["serviceName"]
    ]

    deployment = workload(render("everything on, deployment"))
    assert deployment["kind"] == "Deployment"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"]
    for objects in (render("defaults"), render("everything on, deployment")):
        mounts = {
            m["name"]: m["mountPath"] for m in worker_container(objects)["volumeMounts"]
        }
        config = one(objects, "ConfigMap")["data"]
        assert config["PUSHSTREAM_DATA_DIR"].startswith(mounts["data"] + "/")


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_probes_grace_period_and_resources(name: str) -> None:
    """Kubernetes would kill a stopping worker or route to one still recovering."""
    objects = render(name)
    pod = workload(objects)["spec"]["template"]["spec"]
    container = worker_container(objects)
    config = one(objects, "ConfigMap")["data"]

    (port,) = container["ports"]
    assert port["name"] == "web"
    assert str(port["containerPort"]) == config["PUSHSTREAM_WEB_PORT"]
    assert config["PUSHSTREAM_WEB_HOST"] == "0.0.0.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "web"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "web"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"

    timeout = float(config["PUSHSTREAM_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > timeout + STOP_MARGIN_S
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


@pytest.mark.parametrize("grace", [10, 20, 25])
def test_grace_period_not_above_the_longest_stop_is_refused(grace: int) -> None:
    """A grace period shorter than the stop would SIGKILL workers mid-commit."""
    result = helm(
        "template",
        "ps",
        str(CHART),
        *_sets(
            [
                f"terminationGracePeriodSeconds={grace}",
                "config.shutdownTimeoutSeconds=20",
            ]
        ),
        check=False,
    )
    assert result.returncode != 0
    assert "terminationGracePeriodSeconds" in result.stderr


def test_pod_disruption_budget_selects_the_workers() -> None:
    """A drain could evict every worker at once and stall all partitions."""
    objects = render("defaults")
    budget = one(objects, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    pod_labels = workload(objects)["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def _env(
    objects: Iterable[dict[str, Any]], container: dict[str, Any]
) -> dict[str, str]:
    """The plain environment a container gets (secret references left out)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", ()):
        name = source["configMapRef"]["name"]
        (config,) = [
            c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == name
        ]
        env.update(config["data"])
    env.update(
        {e["name"]: e["value"] for e in container.get("env", ()) if "value" in e}
    )
    return env


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_rendered_settings_are_valid_pushstream_settings(name: str) -> None:
    """A worker would refuse to start on a variable the chart spells wrong."""
    objects = render(name)
    env = _env(objects, worker_container(objects))
    assert all(key.startswith("PUSHSTREAM_") for key in env)
    known = {f"PUSHSTREAM_{field.upper()}" for field in Settings.model_fields}
    for key in env:
        assert key.split("__")[0] in known, key
    settings = _settings_from(env)
    assert settings.web_port == int(env["PUSHSTREAM_WEB_PORT"])


def _settings_from(env: dict[str, str]) -> Settings:
    """Settings read from exactly ``env`` (in a child process, clean environ)."""
    code = (
        "from pushstream.config import load_settings\n"
        "print(load_settings().model_dump_json())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return Settings.model_validate_json(result.stdout)


def test_credentials_and_kafka_security_reach_the_workers() -> None:
    """Provider keys not mounted, or a SASL password in plain text, break prod."""
    objects = render("everything on, deployment")
    container = worker_container(objects)
    pod = workload(objects)["spec"]["template"]["spec"]
    env = _env(objects, container)
    settings = _settings_from(env)

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = one(objects, "Secret")
    assert volumes["credentials"]["secret"]["secretName"] == secret["metadata"]["name"]
    folder = mounts["credentials"]["mountPath"]
    assert mounts["credentials"]["readOnly"] is True
    (apns,) = settings.apns
    (fcm,) = settings.fcm
    assert str(apns.key_file) == f"{folder}/AuthKey_ABCDE12345.p8"
    assert str(fcm.service_account_file) == f"{folder}/fcm.json"
    assert {"AuthKey_ABCDE12345.p8", "fcm.json"} <= set(secret["stringData"])
    assert settings.max_in_flight == 2000

    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert str(settings.kafka_ssl_cafile).startswith(mounts["kafka-tls"]["mountPath"])
    password = [
        e for e in container["env"] if e["name"] == "PUSHSTREAM_KAFKA_SASL_PASSWORD"
    ]
    assert password[0]["valueFrom"]["secretKeyRef"]["name"] == "kafka-user"


def test_topics_job_runs_before_the_workers_with_their_kafka_settings() -> None:
    """Workers refuse to start until their topics exist with the right partitions."""
    for name in CONFIGURATIONS:
        objects = render(name)
        job = one(objects, "Job")
        hooks = job["metadata"]["annotations"]["helm.sh/hook"].split(",")
        assert {"pre-install", "pre-upgrade"} <= set(hooks)
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["topics", "create"]
        worker_env = _env(objects, worker_container(objects))
        for key, value in _env(objects, container).items():
            assert worker_env[key] == value, key
        assert "PUSHSTREAM_KAFKA_BOOTSTRAP" in _env(objects, container)


# --- docker-compose.yml, the image, Prometheus ------------------------------------


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    """`docker compose up` would refuse a file outside the specification."""
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr

    broken = compose()
    broken["services"]["worker"]["depends_on"]["topics"]["condition"] = "whenever"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert check_compose(path).returncode != 0, "the schema check accepts anything"


def test_compose_runs_kafka_topics_sandbox_worker_and_prometheus() -> None:
    """The local trial would start a worker before its topics or scrape nothing."""
    services = compose()["services"]
    assert set(services) >= {"kafka", "topics", "sandbox", "worker", "prometheus"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert (
        services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    )
    assert services["topics"]["command"] == ["topics", "create"]
    worker = services["worker"]
    assert (
        worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    )
    assert worker["depends_on"]["sandbox"]["condition"] == "service_healthy"
    port = worker["environment"]["PUSHSTREAM_WEB_PORT"]
    assert f"{port}:{port}" in worker["ports"]

    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"worker:{port}"]
    mounted = " ".join(services["prometheus"]["volumes"])
    assert "deploy/prometheus.yml" in mounted
    assert "deploy/alerts.yml" in mounted


def test_compose_worker_settings_are_valid() -> None:
    """A misspelt variable in the trial would stop the worker at start."""
    worker = compose()["services"]["worker"]
    env = {k: str(v) for k, v in worker["environment"].items()}
    settings = _settings_from(env)
    assert settings.kafka_bootstrap == "kafka:9092"
    assert "sandbox.env" in " ".join(worker["entrypoint"])


def test_image_runs_pushstream_as_a_user_on_the_web_port() -> None:
    """An image that runs as root or exposes another port breaks the chart."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["pushstream"]' in text
    assert 'CMD ["worker"]' in text
    assert re.search(r"^USER 10001", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 6066$", text, re.MULTILINE)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for name in source.split():
            assert (ROOT / name).exists(), f"COPY source {name} does not exist"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["web"]["port"] == 6066
    assert values["podSecurityContext"]["runAsUser"] == 10001


def _exported_names() -> set[str]:
    """Every sample name /metrics can serve, collector gauges included."""
    census = metrics.DeviceCensus(settled=lambda: True, generation=lambda: 0)
    census.scans = 1
    census.counts[("apns", "active")] = 1
    state = metrics.WorkerState(
        ready=lambda: True,
        assigned=lambda: 1,
        rebalances=lambda: 1,
        lag=lambda: {"t": 0},
        census=census,
    )
    previous = metrics._worker_collector.state
    metrics.watch_worker(state)
    try:
        from prometheus_client.parser import text_string_to_metric_families

        text = metrics.exposition().decode()
        names = set()
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
    finally:
        metrics._worker_collector.state = previous
    # Families whose series appear only once something happened.
    for family in (
        "pushstream_deliveries",
        "pushstream_retries_scheduled",
        "pushstream_dead_letters",
        "pushstream_token_refreshes",
        "pushstream_circuit_breaker_opens",
    ):
        names.add(family + "_total")
    histogram = "pushstream_provider_request_duration_seconds"
    names.update(histogram + suffix for suffix in ("_bucket", "_count", "_sum"))
    names.add("pushstream_circuit_breaker_state")
    return names


def test_alerts_use_metrics_the_worker_exports() -> None:
    """An alert on a misspelt metric never fires, whatever happens."""
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    exported = _exported_names() | {"up"}
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 8
    for rule in alerts:
        assert rule["alert"].startswith("Pushstream")
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        used = set(
            re.findall(r"\b(pushstream_[a-z_]+|up)\b(?=\{|\[|\)|\s|$)", rule["expr"])
        )
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)
    text = (ROOT / "docs" / "operations.md").read_text()
    for rule in alerts:
        assert rule["alert"] in text, f"{rule['alert']} is not in operations.md"
