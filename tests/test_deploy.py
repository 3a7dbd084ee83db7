"""deploy/: Kubernetes manifests (kubernetes-validate, offline schemas; yamllint), their ConfigMap's TOML
through edgesplit.settings, ports and probes against what `edgesplit serve` really serves, the Dockerfiles,
and the Prometheus rules (promtool, when installed) against the names and a recording of a real /metrics."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_cloud_support import eventually as _eventually
from test_cloud_support import ServeProc, mlp_bundle
from test_settings import _parse

from cloud_server.cli import DEFAULT_HTTP
from cloud_server.config import ServerConfig
from edgesplit import settings

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install 'edgesplit[test]'")
yamllint_config = pytest.importorskip("yamllint.config", reason="pip install 'edgesplit[test]'")
from yamllint import linter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAYS = ("gpu", "keda")
PROM = DEPLOY / "prometheus"
# The oldest Kubernetes the manifests promise to run on, and a current one (both schemas ship offline).
K8S_VERSIONS = ("1.30.0", "1.34.0")
CONFIG_PATH = "/etc/edgesplit/edgesplit.toml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (Debian: apt-get install prometheus)")
KUBECTL = shutil.which("kubectl")
KUSTOMIZE = shutil.which("kustomize")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _base() -> dict[tuple[str, str], dict]:
    """(kind, name) -> resource, for every resource the base kustomization lists."""
    kust = _docs(BASE / "kustomization.yaml")[0]
    out = {}
    for f in kust["resources"]:
        for d in _docs(BASE / f):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


def _container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _toml_text() -> str:
    return _base()[("ConfigMap", "edgesplit-config")]["data"]["edgesplit.toml"]


def _metric_names(text: str) -> set[str]:
    """Series names used in PromQL text (metric names only: edgesplit_*)."""
    return set(re.findall(r"\bedgesplit_[a-z_]+\b", text))


# --- style and schemas ---------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert len(files) >= 15, files
    return files


def test_yamllint_passes_on_every_file():
    conf = yamllint_config.YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = {str(p.relative_to(REPO)): [str(x) for x in linter.run(p.read_text(), conf, str(p))]
                for p in _yaml_files()}
    assert not {k: v for k, v in problems.items() if v}
    # the config is live: an "on" that YAML 1.1 would read as true, and a long line, are refused
    bad = "enabled: on\nname: " + "x" * 130 + "\n"
    assert {p.rule for p in linter.run(bad, conf)} >= {"truthy", "line-length"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_base_manifests_pass_kubernetes_validate(version):
    resources = _base()
    assert {k for k, _ in resources} == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                                         "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for (kind, name), doc in resources.items():
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validate_catches_a_wrong_manifest():
    worker = copy.deepcopy(_base()[("Deployment", "edgesplit-worker")])
    worker["spec"]["replicass"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSIONS[0], strict=True)
    worker = copy.deepcopy(_base()[("Deployment", "edgesplit-worker")])
    _container(worker)["resources"]["limits"]["cpu"] = {"cores": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSIONS[0], strict=True)


def _kustomize(overlay: Path) -> list[dict]:
    cmd = [KUBECTL, "kustomize", str(overlay)] if KUBECTL else [KUSTOMIZE, "build", str(overlay)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.mark.skipif(not (KUBECTL or KUSTOMIZE), reason="neither kubectl nor kustomize on PATH")
@pytest.mark.parametrize("overlay", ("base",) + OVERLAYS)
def test_kustomize_builds_and_the_output_validates(overlay):
    path = BASE if overlay == "base" else DEPLOY / "k8s" / "overlays" / overlay
    docs = _kustomize(path)
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "edgesplit"
        if d["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no schema offline (checked by test_keda_scaled_object)
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(d, version, strict=True)
    worker = _container(by[("Deployment", "edgesplit-worker")])
    if overlay == "gpu":
        assert worker["image"] == "edgesplit-cuda:0.1.0"
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert _parse(worker["args"]).device == "cuda:0"
        assert worker["env"] == _container(_base()[("Deployment", "edgesplit-worker")])["env"]  # merged, not lost
        assert by[("Deployment", "edgesplit-worker")]["spec"]["template"]["spec"]["tolerations"][0]["key"] == \
            "nvidia.com/gpu"
    else:
        assert worker["image"] == "edgesplit:0.1.0" and "nvidia.com/gpu" not in worker["resources"]["limits"]
    autoscalers = {k for k in by if k[0] in ("HorizontalPodAutoscaler", "ScaledObject")}
    assert autoscalers == ({("ScaledObject", "edgesplit-worker")} if overlay == "keda"
                           else {("HorizontalPodAutoscaler", "edgesplit-worker")})  # never both on one Deployment


# --- the pieces fit together ---------------------------------------------------------------------


def test_configmap_toml_is_a_valid_server_config(tmp_path):
    f = tmp_path / "edgesplit.toml"
    f.write_text(_toml_text())
    cfg = settings.load(ServerConfig, f, section="server", env={})
    assert cfg != ServerConfig()  # it does set something
    # the broker sheds load ("busy") before the kernel kills it: held bytes below its memory limit
    broker = _container(_base()[("Deployment", "edgesplit-broker")])
    assert cfg.max_held_bytes + cfg.limits.max_message_bytes < _bytes(broker["resources"]["limits"]["memory"])
    # SIGTERM's drain fits in the grace period of both Deployments
    for name in ("edgesplit-broker", "edgesplit-worker"):
        spec = _base()[("Deployment", name)]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > cfg.drain_timeout_s
    # and the worker's variable (from its CPU limit) is a setting the server accepts
    worker = _container(_base()[("Deployment", "edgesplit-worker")])
    env_names = [e["name"] for e in worker["env"] if e["name"].startswith(settings.ENV_PREFIX)]
    assert env_names == ["EDGESPLIT_SERVER_INTRA_OP_THREADS"]
    cpu = worker["resources"]["limits"]["cpu"]
    assert settings.load(ServerConfig, f, section="server", env={env_names[0]: cpu}).intra_op_threads == int(cpu)


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity)
    assert m, quantity
    return int(m.group(1)) * units.get(m.group(2), 1)


def test_commands_parse_with_the_real_cli_and_ports_line_up():
    res = _base()
    broker, worker = (res[("Deployment", n)] for n in ("edgesplit-broker", "edgesplit-worker"))
    b, w = _container(broker), _container(worker)
    assert b["args"][0] == "serve" and w["args"][0] == "worker"
    serve_args, worker_args = _parse(b["args"]), _parse(w["args"])
    assert serve_args.config == worker_args.config == CONFIG_PATH
    assert serve_args.workers == 0  # tails run in the worker Deployment only
    ports = {p["name"]: p["containerPort"] for p in b["ports"]}
    # the usual ports: the CLI's defaults for --bind and --http, the documented worker port
    default_bind = _parse(["serve", "--repository", "r"]).bind
    assert ports["edge"] == _port(serve_args.bind) == _port(default_bind)
    assert ports["http"] == _port(serve_args.http) == _port(DEFAULT_HTTP)
    assert ports["workers"] == _port(serve_args.worker_bind)
    assert serve_args.bind.startswith("tcp://0.0.0.0:") and serve_args.http.startswith("0.0.0.0:")
    # probes on the admin port, at the paths test_broker_command_serves_the_probes checks live
    assert b["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert b["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert b["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    annotations = broker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["http"]) and annotations["prometheus.io/path"] == "/metrics"
    # Services: selectors pick the broker pods, target ports are the container's named ports
    labels = broker["spec"]["template"]["metadata"]["labels"]
    front, back = res[("Service", "edgesplit-broker")], res[("Service", "edgesplit-broker-workers")]
    for svc in (front, back):
        assert svc["spec"]["selector"].items() <= labels.items()
        for p in svc["spec"]["ports"]:
            assert p["port"] == ports[p["targetPort"]]
    assert {p["name"] for p in front["spec"]["ports"]} == {"edge", "http"}
    # workers must reach a broker that is not ready yet (ready = a worker holds a bundle)
    assert back["spec"]["publishNotReadyAddresses"] is True and not front["spec"].get("publishNotReadyAddresses")
    # the workers dial the worker Service, at the address the ConfigMap gives them
    address = res[("ConfigMap", "edgesplit-config")]["data"]["broker-worker-address"]
    assert address == f"tcp://{back['metadata']['name']}:{back['spec']['ports'][0]['port']}"
    env = {e["name"]: e for e in w["env"]}
    assert worker_args.connect == ["$(BROKER_WORKER_ADDRESS)"]  # --connect repeats (one per broker)
    assert env["BROKER_WORKER_ADDRESS"]["valueFrom"]["configMapKeyRef"] == {"name": "edgesplit-config",
                                                                            "key": "broker-worker-address"}
    assert env["EDGESPLIT_SERVER_INTRA_OP_THREADS"]["valueFrom"]["resourceFieldRef"]["containerName"] == w["name"]


def test_volumes_selectors_and_budgets_refer_to_real_things():
    res = _base()
    for name in ("edgesplit-broker", "edgesplit-worker"):
        dep = res[("Deployment", name)]
        spec = dep["spec"]["template"]["spec"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        # a Service named edgesplit-server would inject EDGESPLIT_SERVER_SERVICE_HOST, an unknown setting
        assert spec["enableServiceLinks"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        c = _container(dep)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert set(c["resources"]["requests"]) >= {"cpu", "memory"} and set(c["resources"]["limits"]) >= {"memory"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert volumes[mounts["/etc/edgesplit"]]["configMap"]["name"] == "edgesplit-config"
        assert ("PersistentVolumeClaim", volumes[mounts["/bundles"]]["persistentVolumeClaim"]["claimName"]) in res
        assert Path(CONFIG_PATH).parent == Path("/etc/edgesplit") and "/tmp" in mounts  # ipc sockets live in /tmp
        assert _parse(c["args"]).repository == "/bundles"
    workers = res[("Deployment", "edgesplit-worker")]
    pod_labels = workers["spec"]["template"]["metadata"]["labels"]
    pdb = res[("PodDisruptionBudget", "edgesplit-worker")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = res[("HorizontalPodAutoscaler", "edgesplit-worker")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "edgesplit-worker"}
    assert hpa["minReplicas"] > pdb["spec"]["maxUnavailable"]  # a drain never empties the pool


def test_dockerfiles_are_conventional_and_match_the_manifests():
    cpu, cuda = (DEPLOY / "Dockerfile").read_text(), (DEPLOY / "Dockerfile.cuda").read_text()
    uid = _base()[("Deployment", "edgesplit-broker")]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    broker_ports = {p["containerPort"] for p in _container(_base()[("Deployment", "edgesplit-broker")])["ports"]}
    for text, base_image, extras in ((cpu, "python:3.11-slim", "[server]"), (cuda, "nvidia/cuda:", "[server,gpu]")):
        froms = re.findall(r"(?m)^FROM (\S+)", text)
        assert froms and froms[-1].startswith(base_image)
        assert extras in text
        assert re.search(rf"(?m)^USER {uid}(:\d+)?$", text) and f"--uid {uid}" in text
        assert re.search(r'(?m)^ENTRYPOINT \["edgesplit"\]$', text) and re.search(r"(?m)^HEALTHCHECK NONE$", text)
        exposed = {int(p) for line in re.findall(r"(?m)^EXPOSE (.+)$", text) for p in line.split()}
        assert exposed == broker_ports
    # the CUDA image keeps one onnxruntime: the core dependency and onnxruntime-gpu share the package
    assert "pip uninstall -y onnxruntime" in cuda


# --- a real broker and worker run with the manifests' commands -----------------------------------


def _k8s_args_to_local(args: list[str], replacements: dict[str, str]) -> list[str]:
    return [replacements.get(a, a) for a in args]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Runs the broker and worker commands of the manifests (addresses on loopback, the ConfigMap's TOML as
    the config file) and records /metrics with a worker, then after it left."""
    tmp = tmp_path_factory.mktemp("deploy")
    repo = tmp / "bundles"
    mlp_bundle(repo / "mlp")
    toml = tmp / "edgesplit.toml"
    toml.write_text(_toml_text())
    res = _base()
    b, w = (_container(res[("Deployment", n)]) for n in ("edgesplit-broker", "edgesplit-worker"))
    cfg = settings.load(ServerConfig, toml, section="server", env={})
    # ServeProc picks loopback ports itself (--bind/--http given first; argparse keeps the last)
    serve_args = _k8s_args_to_local(b["args"], {CONFIG_PATH: str(toml), "/bundles": str(repo),
                                                "tcp://0.0.0.0:5555": "tcp://127.0.0.1:0",
                                                "0.0.0.0:8080": "127.0.0.1:0",
                                                "tcp://0.0.0.0:5556": "tcp://127.0.0.1:0"})[1:]
    out = {}
    with ServeProc(repo, workers=None, extra=serve_args, heartbeat_ms=cfg.heartbeat_interval_s * 1000) as server:
        out["healthz"], out["readyz_empty"] = server.get("/healthz")[0], server.get("/readyz")[0]
        assert server.back.startswith("tcp://127.0.0.1:"), server.lines  # the --worker-bind socket
        worker_cmd = _k8s_args_to_local(w["args"], {CONFIG_PATH: str(toml), "/bundles": str(repo),
                                                    "$(POD_NAME)": "edgesplit-worker-abc12",
                                                    "$(BROKER_WORKER_ADDRESS)": server.back})
        env = {**_clean_env(), "EDGESPLIT_SERVER_INTRA_OP_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "edgesplit", *worker_cmd], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert _eventually(lambda: server.get("/readyz")[0] == 200, 120), worker_cmd
            out["readyz_worker"] = server.get("/readyz")[0]
            out["metrics_worker"] = server.get("/metrics")[1]
            out["models"] = server.json("/v1/models")
        finally:
            proc.send_signal(signal.SIGTERM)
            out["worker_rc"] = proc.wait(60)
        assert _eventually(lambda: server.metric("edgesplit_live_workers") == 0, 60)
        out["readyz_after"] = server.get("/readyz")[0]
        out["metrics_empty"] = server.get("/metrics")[1]
    return out


def _clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGESPLIT_SERVER_")}


def test_broker_command_serves_the_probes(recorded):
    assert recorded["healthz"] == 200
    assert recorded["readyz_empty"] == 503  # no worker yet: the Service sends no edge here
    assert recorded["readyz_worker"] == 200
    assert recorded["readyz_after"] == 503
    assert recorded["worker_rc"] == 0  # SIGTERM: drained and said goodbye
    (worker,) = recorded["models"]["workers"]
    assert worker["name"] == "edgesplit-worker-abc12"  # --name $(POD_NAME)
    assert 'edgesplit_worker_up{device="cpu",worker="edgesplit-worker-abc12"} 1.0' in recorded["metrics_worker"]


def _served_names(metrics_text: str) -> set[str]:
    return {re.split(r"[{ ]", line, 1)[0] for line in metrics_text.splitlines() if line and not line.startswith("#")}


def test_rules_and_autoscalers_use_metric_names_the_broker_serves(recorded):
    served = _served_names(recorded["metrics_worker"])
    adapter = _docs(PROM / "adapter-rules.yaml")[0]["externalRules"]
    made_by_adapter = {r["name"]["as"] for r in adapter} - served
    assert made_by_adapter == {"edgesplit_deadline_misses_per_second"}
    used = {
        "alerts.yml": _metric_names(json_dump(_docs(PROM / "alerts.yml"))),
        "adapter-rules.yaml": _metric_names(" ".join(r["seriesQuery"] + r["metricsQuery"] for r in adapter)),
        "keda": _metric_names(json_dump(_docs(DEPLOY / "k8s/overlays/keda/worker-scaledobject.yaml"))),
        "hpa": {m["external"]["metric"]["name"] for m in
                _base()[("HorizontalPodAutoscaler", "edgesplit-worker")]["spec"]["metrics"]},
        "grafana": _metric_names(" ".join(t["expr"] for p in _dashboard()["panels"] for t in p["targets"])),
    }
    for where, names in used.items():
        assert names, where
        unknown = names - served - (made_by_adapter if where in ("hpa", "adapter-rules.yaml") else set())
        if where == "grafana":  # a labelled gauge has no series until a label set exists (load errors)
            unknown -= _declared_families()
        assert not unknown, f"{where} uses metrics the broker does not serve: {unknown}"
    assert "edgesplit_requests_total" in used["alerts.yml"] and "edgesplit_live_workers" in used["alerts.yml"]


def _declared_families() -> set[str]:
    """Every metric family cloud_server.metrics declares, whether or not it has samples yet."""
    from cloud_server.metrics import Metrics

    return {fam.name for fam in Metrics(enabled=True).registry.collect()}


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "edgesplit-pool.json").read_text())


def test_the_grafana_dashboard_is_well_formed():
    dash = _dashboard()
    assert dash["uid"] and dash["panels"] and all(p["targets"] for p in dash["panels"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in dash["panels"]:  # every query is scoped to the chosen jobs and has balanced brackets
        for t in p["targets"]:
            assert 'job=~"$job"' in t["expr"], t["expr"]
            assert t["expr"].count("(") == t["expr"].count(")") and t["expr"].count("{") == t["expr"].count("}")


def json_dump(obj) -> str:
    return json.dumps(obj)


def test_keda_scaled_object():
    (so,) = _docs(DEPLOY / "k8s/overlays/keda/worker-scaledobject.yaml")
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
    assert so["spec"]["scaleTargetRef"]["name"] == "edgesplit-worker"
    assert ("Deployment", so["spec"]["scaleTargetRef"]["name"]) in _base()
    assert {t["type"] for t in so["spec"]["triggers"]} == {"prometheus"}
    for t in so["spec"]["triggers"]:
        assert float(t["metadata"]["threshold"]) > 0 and t["metadata"]["query"]


# --- Prometheus rules ------------------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_and_unit_tests_the_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout
    r = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, timeout=120,
                       cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_fails_a_broken_rule(tmp_path):
    broken = (PROM / "alerts.yml").read_text().replace("max by (namespace, pod) (edgesplit_live_workers) == 0",
                                                       "max by (namespace, pod) (edgesplit_live_workers == 0")
    (tmp_path / "alerts.yml").write_text(broken)
    r = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "alerts.yml")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0


def _series_from_metrics(text: str, steps: int) -> list[dict]:
    """promtool input series holding a recorded /metrics page constant for `steps` intervals."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        v = float(value)
        if math.isfinite(v):
            out.append({"series": series, "values": f"{v!r}x{steps}"})
    assert out
    return out


@needs_promtool
def test_alerts_on_a_recorded_metrics_page(recorded, tmp_path):
    """promtool evaluates alerts.yml on the real broker's /metrics: quiet with a worker, pool empty without."""
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    (pool_empty,) = [r for r in rules["groups"][0]["rules"] if r["alert"] == "EdgesplitPoolEmpty"]
    names = [r["alert"] for r in rules["groups"][0]["rules"]]
    # the recording has no namespace/pod labels (no Kubernetes scrape here): the templates render them empty
    annotations = {k: v.replace("{{ $labels.pod }}", "") for k, v in pool_empty["annotations"].items()}
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "15s", "tests": [
        {"interval": "15s", "input_series": _series_from_metrics(recorded["metrics_worker"], 40),
         "alert_rule_test": [{"eval_time": "10m", "alertname": a, "exp_alerts": []} for a in names]},
        {"interval": "15s", "input_series": _series_from_metrics(recorded["metrics_empty"], 40),
         "alert_rule_test": [{"eval_time": "30s", "alertname": "EdgesplitPoolEmpty", "exp_alerts": []},
                             {"eval_time": "2m", "alertname": "EdgesplitPoolEmpty", "exp_alerts": [
                                 {"exp_labels": pool_empty["labels"], "exp_annotations": annotations}]}]},
    ]}
    (tmp_path / "recorded_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    r = subprocess.run([PROMTOOL, "test", "rules", "recorded_test.yml"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr + "\n" + shlex.join(["promtool", "test", "rules", str(tmp_path)])
