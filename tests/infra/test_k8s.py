"""The Kubernetes manifests in infra/k8s, checked offline: every object against the Kubernetes JSON schemas
that the `kubernetes-validate` package ships (strict: an unknown field such as a misspelt probe is an
error), and what no schema can see: Services and PodDisruptionBudgets that select real pods, ports and
probes that name declared ports, every `HBREG_*` variable a real setting with a valid value, every
ConfigMap/Secret reference pointing at a defined key, the ConfigMaps generated from the files in infra/
(one copy of each), every long-running process of the Procfile deployed, and pods hardened.

The ConfigMaps and the Secret are made by kustomize's generators, so the tests build them the way kustomize
does (from hbreg.env, secrets.env.example standing in for the git-ignored secrets.env, and the infra
files); where `kubectl` is installed the last test renders the kustomization itself and validates that.
"""

from __future__ import annotations

import copy
import dataclasses
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml

from heartbeat_registry.core.settings import PREFIX, Settings, parse_field
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.cli import build_parser
from sinks.web.dashboard import check_auth_setting
from tests import procs
from tests.conftest import require_binary

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
# The oldest Kubernetes these manifests are for (gRPC probes and preStop `sleep` need 1.30); the schemas
# are shipped inside the kubernetes-validate package, so nothing is fetched.
KUBERNETES_VERSION = "1.30.0"
WORKLOADS = ("Deployment", "StatefulSet")
# Procfile processes that are not deployed here: the embedded services (operators bring Redis and Kafka)
# and the reference Role Assignment service (production brings its own).
NOT_DEPLOYED = {"valkey", "kafka", "alertmanager", "assigner"}
CONFIGMAP_LIMIT = 1024 * 1024  # what the API server stores in one ConfigMap


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def env_file(path: pathlib.Path) -> dict[str, str]:
    """KEY=VALUE lines as kustomize's `envs:` reads them (comments and blank lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        out[key.strip()] = value
    return out


def generator_sources(entry: dict[str, Any]) -> dict[str, pathlib.Path]:
    """key -> file of one generator's `files:` (`key=path` or a path whose name is the key)."""
    out = {}
    for item in entry.get("files", []):
        key, sep, path = item.partition("=")
        out[key if sep else pathlib.Path(item).name] = K8S / (path if sep else item)
    return out


def generated() -> list[dict[str, Any]]:
    """The ConfigMaps and Secrets of the generators, named without kustomize's hash suffix (the names
    the manifests use; kustomize rewrites the references together with the names)."""
    out = []
    for kind, section in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for entry in kustomization().get(section, []):
            data: dict[str, str] = {}
            for env in entry.get("envs", []):
                path = K8S / env
                if not path.exists() and path.name == "secrets.env":
                    path = K8S / "secrets.env.example"
                data.update(env_file(path))
            for key, path in generator_sources(entry).items():
                data[key] = path.read_text()
            labels = entry.get("options", {}).get("labels", {})
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": kind,
                    "metadata": {"name": entry["name"], **({"labels": labels} if labels else {})},
                    ("stringData" if kind == "Secret" else "data"): data,
                }
            )
    return out


def resources() -> list[dict[str, Any]]:
    """Every object of the kustomization's resource files, then the generated ones."""
    out = []
    for name in kustomization()["resources"]:
        out += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return out + generated()


def of_kind(objects: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in kinds]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod labels, pod spec) of every Deployment and StatefulSet."""
    for workload in of_kind(objects, *WORKLOADS):
        template = workload["spec"]["template"]
        yield workload["metadata"]["name"], template["metadata"]["labels"], template["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def unmatched_selectors(objects: list[dict[str, Any]]) -> list[str]:
    """Services and PodDisruptionBudgets whose selector matches no workload's pods."""
    pods = [labels for _, labels, _ in pod_specs(objects)]
    bad = []
    for obj in of_kind(objects, "Service", "PodDisruptionBudget"):
        spec = obj["spec"]
        selector = spec.get("selector", {}) if obj["kind"] == "Service" else spec["selector"].get("matchLabels", {})
        if not any(selects(selector, labels) for labels in pods):
            bad.append(f"{obj['kind']}/{obj['metadata']['name']}")
    return bad


def env_names(objects: list[dict[str, Any]]) -> set[str]:
    """Every environment variable name the manifests set: container env and the generated config."""
    names = {e["name"] for _, _, spec in pod_specs(objects) for c in containers(spec) for e in c.get("env", [])}
    for obj in of_kind(objects, "ConfigMap", "Secret"):
        if obj["metadata"]["name"] in ("hbreg-config", "hbreg-secrets"):
            names |= set(obj.get("data") or obj.get("stringData") or {})
    return names


def unknown_settings(names: set[str]) -> set[str]:
    fields = {PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    return {n for n in names if n.startswith(PREFIX) and n not in fields}


def dangling_refs(objects: list[dict[str, Any]]) -> list[str]:
    """configMapKeyRef / secretKeyRef / envFrom / volumes naming an object or key that is not defined."""
    defined = {
        (o["kind"], o["metadata"]["name"]): set(o.get("data") or o.get("stringData") or {})
        for o in of_kind(objects, "ConfigMap", "Secret")
    }
    bad = []
    for workload, _, spec in pod_specs(objects):
        refs: list[tuple[str, str, str | None]] = []
        for container in containers(spec):
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    refs.append(("ConfigMap", source["configMapKeyRef"]["name"], source["configMapKeyRef"]["key"]))
                if "secretKeyRef" in source:
                    refs.append(("Secret", source["secretKeyRef"]["name"], source["secretKeyRef"]["key"]))
            for env_from in container.get("envFrom", []):
                if "configMapRef" in env_from:
                    refs.append(("ConfigMap", env_from["configMapRef"]["name"], None))
                if "secretRef" in env_from:
                    refs.append(("Secret", env_from["secretRef"]["name"], None))
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                refs.append(("ConfigMap", volume["configMap"]["name"], None))
            if "secret" in volume:
                refs.append(("Secret", volume["secret"]["secretName"], None))
        for kind, name, key in refs:
            keys = defined.get((kind, name))
            if keys is None or (key is not None and key not in keys):
                bad.append(f"{workload}: {kind} {name}" + (f" key {key}" if key else ""))
    return bad


# --- the schemas ---------------------------------------------------------------------------------------


def test_every_manifest_is_in_the_kustomization() -> None:
    """A file that is not listed would never be applied; a listed one must exist."""
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_every_object_passes_the_kubernetes_schema() -> None:
    """Strict validation of every object, generated ConfigMaps and Secret included. The kustomization
    file itself is kustomize's input, not a Kubernetes object: no schema of the API server covers it (and
    none is needed: `kubectl kustomize` below reads it). There are no custom resources here (rules and
    dashboards are ConfigMaps), so nothing is skipped for want of a schema."""
    objects = resources()
    assert {o["kind"] for o in objects} >= {
        "Namespace",
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # the validator really looks: a misspelt field and a wrong type are refused
    broken = copy.deepcopy(of_kind(objects, "Deployment")[0])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"periodSeconds": 5}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(of_kind(objects, "PodDisruptionBudget")[0])
    broken["spec"]["maxUnavailable"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --- what the schemas cannot see -------------------------------------------------------------------------


def test_services_and_budgets_select_pods_and_ports() -> None:
    objects = resources()
    assert unmatched_selectors(objects) == []
    control = copy.deepcopy(of_kind(objects, "Service")[0])
    control["spec"]["selector"] = {"app.kubernetes.io/component": "ingets"}
    assert unmatched_selectors([*objects, control]) == [f"Service/{control['metadata']['name']}"]

    pods = list(pod_specs(objects))
    for service in of_kind(objects, "Service"):
        matched = [spec for _, labels, spec in pods if selects(service["spec"]["selector"], labels)]
        declared = {
            (p.get("name"), p["containerPort"]) for spec in matched for c in spec["containers"] for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in pair for pair in declared), f"{service['metadata']['name']}: no pod port {target}"
    # a StatefulSet's governing Service is headless: it gives each pod its own name
    for workload in of_kind(objects, "StatefulSet"):
        governing = [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == workload["spec"]["serviceName"]]
        assert governing and governing[0]["spec"].get("clusterIP") == "None", workload["metadata"]["name"]


def test_budgets_cover_every_replicated_workload() -> None:
    """Each workload of several replicas has exactly one PodDisruptionBudget, and none blocks all evictions."""
    objects = resources()
    budgets = of_kind(objects, "PodDisruptionBudget")
    for workload in of_kind(objects, *WORKLOADS):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        mine = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        if workload["spec"].get("replicas", 1) > 1:
            assert len(mine) == 1, workload["metadata"]["name"]
            assert (
                mine[0]["spec"].get("maxUnavailable", 0) >= 1
                or mine[0]["spec"].get("minAvailable", 0) < (workload["spec"]["replicas"])
            )
        else:
            assert mine == [], f"{workload['metadata']['name']}: a budget on one replica blocks node drains"


def test_probes_and_addresses_use_declared_ports() -> None:
    """Every probe names a port its container declares, and every HBREG_*_ADDR a process serves on binds
    all interfaces at the port its pod declares (a probe against 127.0.0.1 would never pass)."""
    objects = resources()
    config = env_file(K8S / "hbreg.env")
    served = {  # hbreg command -> the variables of the addresses it serves
        "ingest": ("HBREG_GRPC_ADDR", "HBREG_INGEST_METRICS_ADDR"),
        "bridge": ("HBREG_BRIDGE_METRICS_ADDR",),
        "worker": ("HBREG_WORKER_WEB_ADDR",),
        "query": ("HBREG_HTTP_ADDR",),
        "reassign": ("HBREG_REASSIGN_METRICS_ADDR",),
        "alerter": ("HBREG_ALERTS_METRICS_ADDR",),
    }
    seen = set()
    for _, _, spec in pod_specs(objects):
        for container in containers(spec):
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                handler = probe.get("httpGet") or probe.get("grpc") or probe.get("tcpSocket")
                port = handler["port"]
                assert port in ports or port in ports.values(), f"{container['name']} {kind}: port {port}"
            if container.get("command") != ["hbreg"]:
                continue
            command = container["args"][0]
            for var in served[command]:
                host, _, port = config[var].rpartition(":")
                assert host == "0.0.0.0", var
                assert int(port) in ports.values(), f"{command}: {var} port {port} not declared"
            seen.add(command)
    assert seen == set(served)


def test_every_long_running_process_is_deployed_with_a_real_command() -> None:
    """The Procfile lists every long-running process: each is deployed (but the embedded services and
    the reference assigner), and each container's arguments parse as that `hbreg` command."""
    procfile = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            procfile[name.strip()] = command.split()
    wanted = {command[1] for name, command in procfile.items() if name not in NOT_DEPLOYED}
    deployed = set()
    parser = build_parser()
    for _, _, spec in pod_specs(resources()):
        for container in spec["containers"]:
            if container.get("command") == ["hbreg"]:
                args = parser.parse_args(container["args"])
                deployed.add(args.command)
    assert deployed == wanted


def test_hbreg_variables_are_settings_with_valid_values() -> None:
    objects = resources()
    names = env_names(objects)
    assert unknown_settings(names) == set()
    assert unknown_settings(names | {"HBREG_REDIS_CLUSTERED"}) == {"HBREG_REDIS_CLUSTERED"}  # the check bites
    assert {"HBREG_REDIS_CLUSTER", "HBREG_KAFKA_REPLICATION_FACTOR", "HBREG_KAFKA_MIN_INSYNC_REPLICAS"} <= names

    # the whole configuration parses as every process would read it (cross-field rules included)
    env = {**env_file(K8S / "hbreg.env"), **env_file(K8S / "secrets.env.example")}
    settings = Settings.from_env(env, use_state=False)
    assert settings.redis_cluster and settings.kafka_replication_factor == 3
    assert settings.kafka_min_insync_replicas == 2
    assert settings.topic_partitions == settings.stream_shards
    for name, value in env.items():
        parse_field(name[len(PREFIX) :].lower(), value, name)
    # the example secrets fail closed: the processes refuse them at start
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        settings.signing_secret()
    with pytest.raises(ConfigError, match="USER:PASSWORD"):
        check_auth_setting(settings)
    real = dataclasses.replace(settings, auth_secret="x" * 64, http_auth="ops:secret")
    assert real.signing_secret() == b"x" * 64
    check_auth_setting(real)


def test_references_point_at_defined_keys() -> None:
    objects = resources()
    assert dangling_refs(objects) == []
    control = copy.deepcopy(of_kind(objects, "Deployment")[0])
    control["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "HBREG_AUTH", "valueFrom": {"secretKeyRef": {"name": "hbreg-secrets", "key": "HBREG_AUTHH"}}}
    )
    assert dangling_refs([*objects, control]) == [
        f"{control['metadata']['name']}: Secret hbreg-secrets key HBREG_AUTHH"
    ]
    # secrets only by reference: no HBREG_ secret written into a manifest
    for _, _, spec in pod_specs(objects):
        for container in containers(spec):
            for env in container.get("env", []):
                if env["name"] in ("HBREG_AUTH_SECRET", "HBREG_HTTP_AUTH", "HBREG_REDIS_URL"):
                    assert "secretKeyRef" in env.get("valueFrom", {}), env["name"]
    assert not set(env_file(K8S / "hbreg.env")) & set(env_file(K8S / "secrets.env.example"))


def test_generated_configmaps_are_the_infra_files() -> None:
    """Alertmanager's configuration, the Prometheus rules and the Grafana dashboard are generated from
    their one copy in infra/, each under the API server's size limit, the dashboard with the label
    Grafana's sidecar looks for."""
    entries = {e["name"]: generator_sources(e) for e in kustomization()["configMapGenerator"]}
    assert {k: {key: p.resolve() for key, p in v.items()} for k, v in entries.items() if v} == {
        "hbreg-alertmanager-config": {"alertmanager.yml": ROOT / "infra" / "alertmanager" / "alertmanager.yml"},
        "hbreg-prometheus-rules": {"rules.yml": ROOT / "infra" / "prometheus" / "rules.yml"},
        "hbreg-grafana-dashboard": {"heartbeat-registry.json": ROOT / "infra" / "grafana" / "heartbeat-registry.json"},
    }
    for configmap in of_kind(generated(), "ConfigMap"):
        assert sum(len(v.encode()) for v in configmap["data"].values()) < CONFIGMAP_LIMIT
    dashboards = [c for c in generated() if c["metadata"]["name"] == "hbreg-grafana-dashboard"]
    assert dashboards[0]["metadata"]["labels"] == {"grafana_dashboard": "1"}


def test_pods_run_hardened() -> None:
    """Non-root, read-only root file system, no privilege escalation, no capabilities, the runtime's
    seccomp profile, requests and limits on every container, no service account token."""
    for workload, _, spec in pod_specs(resources()):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, workload
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        assert spec["automountServiceAccountToken"] is False, workload
        for container in containers(spec):
            context = container["securityContext"]
            where = f"{workload}/{container['name']}"
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            resources_ = container["resources"]
            assert set(resources_["requests"]) == set(resources_["limits"]) == {"cpu", "memory"}, where


# --- the Alertmanager wiring, run for real ----------------------------------------------------------------


def render_alertmanager_config(tmp_path: pathlib.Path, http_auth: str, webhook_url: str) -> pathlib.Path:
    """Run the init container's script of the Alertmanager StatefulSet with this machine's /bin/sh on the
    real infra/alertmanager/alertmanager.yml; returns the folder it rendered into."""
    statefulset = next(o for o in resources() if o["metadata"]["name"] == "hbreg-alertmanager" and "spec" in o)
    init = statefulset["spec"]["template"]["spec"]["initContainers"][0]
    env = {e["name"]: e.get("value") for e in init["env"]}
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    # the script reads the file where the ConfigMap volume puts it
    assert env["AM_SOURCE"] == mounts["source"] + "/alertmanager.yml"
    assert env["AM_RENDERED"] == mounts["rendered"]
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    run = subprocess.run(
        [*init["command"], *init["args"]],
        env={
            "PATH": os.environ["PATH"],
            "HBREG_HTTP_AUTH": http_auth,
            "AM_WEBHOOK_URL": webhook_url,
            "AM_SOURCE": str(ROOT / "infra" / "alertmanager" / "alertmanager.yml"),
            "AM_RENDERED": str(rendered),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    return rendered


def test_alertmanager_config_is_rendered_with_the_query_api_and_its_credentials(tmp_path: pathlib.Path) -> None:
    require_binary(shutil.which("amtool") is not None, "amtool (Debian's prometheus-alertmanager; make install)")
    rendered = render_alertmanager_config(tmp_path, "ops:pass:word", "http://hbreg-query:8080/api/alertmanager/webhook")
    text = (rendered / "alertmanager.yml").read_text()
    assert "127.0.0.1:8080" not in text
    receiver = yaml.safe_load(text)["receivers"][0]["webhook_configs"][0]
    assert receiver["url"] == "http://hbreg-query:8080/api/alertmanager/webhook"
    assert receiver["http_config"] == {"authorization": {"credentials_file": str(rendered / "webhook-token")}}
    assert (rendered / "webhook-token").read_text() == "pass:word"  # the password, as the query API splits it
    assert (rendered / "webhook-token").stat().st_mode & 0o077 == 0
    checked = subprocess.run(
        ["amtool", "check-config", str(rendered / "alertmanager.yml")], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
    # everything but the webhook is the file as it is in infra/
    source = yaml.safe_load((ROOT / "infra" / "alertmanager" / "alertmanager.yml").read_text())
    mine = yaml.safe_load(text)
    for part in ("global", "route", "inhibit_rules"):
        assert mine[part] == source[part]


def test_alertmanager_delivers_to_the_webhook_with_the_password(tmp_path: pathlib.Path) -> None:
    """The real Alertmanager on the rendered configuration: a critical alert reaches the webhook (5 s
    group_wait of the critical route) with the password of HBREG_HTTP_AUTH as its Bearer token, which the
    query API accepts."""
    binary = services.alertmanager_binary()
    require_binary(binary is not None, "prometheus-alertmanager (Debian's package; make install)")
    assert binary is not None
    received: list[tuple[str, dict[str, Any]]] = []

    class Webhook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path + " " + self.headers.get("Authorization", ""), json.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/api/alertmanager/webhook"
    rendered = render_alertmanager_config(tmp_path, "ops:s3cr:et", hook)
    port = services.free_port()
    member = subprocess.Popen(
        [
            binary,
            f"--config.file={rendered / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        services.wait_port("127.0.0.1", port, 20, "alertmanager")
        alert = [{"labels": {"alertname": "K8sWiring", "severity": "critical", "cluster": "test"}}]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v2/alerts",
            data=json.dumps(alert).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=5).close()
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        procs.stop(member)
        receiver.shutdown()
    assert received, "Alertmanager sent no notification to the webhook within 30 s"
    where, body = received[0]
    assert where == "/api/alertmanager/webhook Bearer s3cr:et"
    assert body["commonLabels"]["alertname"] == "K8sWiring"


# --- kustomize itself ---------------------------------------------------------------------------------


def test_kustomize_renders_valid_objects(tmp_path: pathlib.Path) -> None:
    """The kustomization as `kubectl kustomize` builds it (with secrets.env made from the example, and
    the load restrictor off for the files one directory up): every object valid, every generated name's
    references rewritten, everything in the namespace."""
    require_binary(shutil.which("kubectl") is not None, "kubectl (its `kustomize` renders infra/k8s)")
    copy_root = tmp_path / "infra"
    shutil.copytree(ROOT / "infra", copy_root, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(copy_root / "k8s" / "secrets.env.example", copy_root / "k8s" / "secrets.env")
    built = subprocess.run(
        ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(copy_root / "k8s")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    objects = [o for o in yaml.safe_load_all(built.stdout) if o]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "heartbeat-registry"
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    hashed = [n for kind, n in names if kind in ("ConfigMap", "Secret") and re.search(r"-[a-z0-9]{10}$", n)]
    assert len(hashed) == 3, names  # config, Alertmanager's config, secrets: pods roll when they change
    assert dangling_refs(objects) == []
    assert unmatched_selectors(objects) == []
    rules = next(o for o in objects if o["metadata"]["name"] == "hbreg-prometheus-rules")
    assert rules["data"]["rules.yml"] == (ROOT / "infra" / "prometheus" / "rules.yml").read_text()
    # the default restriction refuses the files outside infra/k8s: the documented flag is needed
    refused = subprocess.run(
        ["kubectl", "kustomize", str(copy_root / "k8s")], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "not in or below" in refused.stderr
