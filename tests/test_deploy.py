"""The cluster manifests: valid against real schemas, offline, and in agreement with the service config."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject  # noqa: F401 - the KEDA models load
from cloudcoil.models.knative_serving.serving.v1 import Service as KnativeService

from deploy.cluster.cluster import request_limit
from deploy.cluster.parts import Replica, debian_binary, haproxy_config
from deploy.generate import HERE, SHARED, Deployment, manifests, render
from services.config import TIMEOUT_GRACE_SECONDS, Settings, get_settings
from tests.server import ROOT

K8S = "1.37.0"
settings = get_settings()
spec = Deployment()


def load(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((HERE / name).read_text()))


@pytest.mark.parametrize("name", sorted(manifests()))
def test_committed_manifests_are_generated_from_the_current_config(name: str) -> None:
    assert (HERE / name).read_text() == render(manifests()[name]), "run deploy/generate.py"


def check_container(container: dict[str, Any]) -> None:
    """Probes and port agree with what `bentoml serve` exposes; valid as a core Pod's container."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check"},
        "spec": {"containers": [container]},
    }
    kubernetes_validate.validate(pod, K8S, strict=True)
    assert container["ports"][0]["containerPort"] == spec.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": spec.port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": spec.port}
    assert "initialDelaySeconds" not in container["livenessProbe"]  # the start-up probe covers start-up
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/livez", "port": spec.port}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # a slow start is not killed
    assert startup["periodSeconds"] == 1  # and a cold start waits at most a second on it
    shared = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    [secret] = load("secret.yaml")
    kubernetes_validate.validate(secret, K8S, strict=True)
    assert {name: ref["name"] for name, ref in shared.items()} == dict.fromkeys(
        SHARED, secret["metadata"]["name"]
    )
    assert {ref["key"] for ref in shared.values()} == secret["stringData"].keys()
    assert all(name.removeprefix("FNSERVE_").lower() in Settings.model_fields for name in shared)


def test_knative_service() -> None:
    [document] = load("knative-service.yaml")
    service = KnativeService.model_validate(document)
    template = service.spec.template
    assert template.metadata.annotations["autoscaling.knative.dev/min-scale"] == "0"
    assert template.spec.container_concurrency == settings.max_concurrency
    assert template.spec.timeout_seconds == settings.request_timeout_seconds  # streams fit
    check_container(document["spec"]["template"]["spec"]["containers"][0])


def test_kserve_inference_service_in_knative_mode() -> None:
    [document] = load("kserve-inferenceservice.yaml")
    assert document["apiVersion"] == "serving.kserve.io/v1beta1" and document["kind"] == "InferenceService"
    assert document["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    predictor = document["spec"]["predictor"]
    assert predictor["minReplicas"] == 0
    assert predictor["containerConcurrency"] == settings.max_concurrency
    assert predictor["timeout"] == settings.request_timeout_seconds
    check_container(predictor["containers"][0])


def test_keda_http_add_on_variant() -> None:
    deployment, service, scaled = load("keda-http.yaml")
    for document in (deployment, service):
        kubernetes_validate.validate(document, K8S, strict=True)
    check_container(deployment["spec"]["template"]["spec"]["containers"][0])
    target = scaled["spec"]["scaleTargetRef"]
    assert scaled["kind"] == "HTTPScaledObject" and scaled["spec"]["replicas"]["min"] == 0
    assert (target["name"], target["service"]) == (
        deployment["metadata"]["name"],
        service["metadata"]["name"],
    )
    assert target["port"] == service["spec"]["ports"][0]["port"] == spec.port
    assert scaled["spec"]["timeouts"]["responseHeader"] == settings.request_timeout_seconds
    # A request that wakes the Deployment is held as long as a replica may take to start.
    startup = deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert (
        scaled["spec"]["timeouts"]["conditionWait"] == startup["failureThreshold"] * startup["periodSeconds"]
    )
    # SIGKILL comes after a request's whole deadline and the gRPC grace: not mid-answer.
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.request_timeout_seconds + TIMEOUT_GRACE_SECONDS


def test_bentocloud_deployment_scales_every_service_to_zero() -> None:
    from services.service import Frontend

    [document] = load("bentocloud-deployment.yaml")
    names = {Frontend.name, *(dep.on.name for dep in Frontend.dependencies.values())}
    assert set(document["services"]) == names
    assert all(service["scaling"]["min_replicas"] == 0 for service in document["services"].values())
    # Replicas share batches and caches only through the secret's variables (README, Cluster manifests).
    assert document["secrets"] == [spec.secret]
    assert all(name.removeprefix("FNSERVE_").lower() in Settings.model_fields for name in SHARED)


def test_the_local_clusters_balancer_lets_a_request_run_to_its_deadline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """HAProxy's timeouts and its soft stop's bound follow the request deadline the replicas are given:
    a shorter one makes the balancer's shorter, a longer one would otherwise be cut by it."""
    monkeypatch.setenv("FNSERVE_REQUEST_TIMEOUT_SECONDS", "1200")
    get_settings.cache_clear()
    try:
        limit = request_limit()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert limit == 1200 + 2 * TIMEOUT_GRACE_SECONDS
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(8000, 8001, [Replica("r0", 8002, 8003)], tmp_path / "sock", limit))
    lines = {" ".join(line.split()) for line in config.read_text().splitlines()}
    assert {f"hard-stop-after {limit}s", f"timeout client {limit}s", f"timeout server {limit}s"} <= lines
    checked = subprocess.run(
        [debian_binary("/usr/sbin/haproxy"), "-c", "-f", str(config)], capture_output=True
    )
    assert checked.returncode == 0, checked.stderr


NOT_SERVED = {"gguf", "accelerate"}  # the model importer's (`make models`), not the server's


def test_the_bento_pins_every_package_the_server_runs_as_the_project_does() -> None:
    """The image runs what the tests ran: a package pinned in pyproject.toml but left to the Bento's
    lock would be whatever release was newest on the day the image was built."""

    def pins(specs: list[str]) -> dict[str, str]:
        return {re.split(r"[=<>\[ ;]", spec)[0].lower(): spec for spec in specs}

    project = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    bento = pins(yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"])
    assert bento == {name: spec for name, spec in project.items() if name not in NOT_SERVED}


def test_models_kept_resident_keep_a_replica_on_every_platform() -> None:
    """FNSERVE_IDLE_RELEASE_SECONDS=never keeps the models loaded; written as a 0 s scale-down, it had
    made every platform scale to zero as fast as it can."""
    made = manifests(settings=Settings(idle_release_seconds="never"))
    [knative_service] = made["knative-service.yaml"]
    [inference] = made["kserve-inferenceservice.yaml"]
    _, _, scaled = made["keda-http.yaml"]
    [cloud] = made["bentocloud-deployment.yaml"]
    assert (
        knative_service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"]
        == "1"
    )
    assert inference["spec"]["predictor"]["minReplicas"] == scaled["spec"]["replicas"]["min"] == 1
    assert all(service["scaling"]["min_replicas"] == 1 for service in cloud["services"].values())
