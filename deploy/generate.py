"""Cluster manifests for fnserve, generated from one source so ports, probes, concurrency and timeouts agree.

    .venv/bin/python deploy/generate.py          # rewrites deploy/*.yaml
    IMAGE=registry.example.com/fnserve:1 .venv/bin/python deploy/generate.py

The values come from `services.config.Settings` (concurrency, timeout) and `Deployment` below (image,
port, resources); `tests/test_deploy.py` validates the files offline and checks they are up to date.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.config import TIMEOUT_GRACE_SECONDS, Settings, get_settings  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Deployment:
    image: str = os.environ.get("IMAGE", "fnserve:latest")
    name: str = "fnserve"
    port: int = 3000  # `bentoml serve` and the container's default
    grpc_port: int = 3001  # FNSERVE_GRPC_PORT's default
    cpu: str = "2000m"
    memory: str = "4Gi"
    env: dict[str, str] = field(
        default_factory=lambda: {"BENTOML_DO_NOT_TRACK": "true", "FNSERVE_GRPC_HOST": "0.0.0.0"}
    )
    secret: str = "fnserve-cluster"  # what replicas share: the batch database and Redis (secret.yaml)


# Settings every replica takes from the Secret, by the Secret's key.
SHARED = {"FNSERVE_BATCH_DATABASE_URL": "batch-database-url", "FNSERVE_REDIS_URL": "redis-url"}
STARTUP_SECONDS = 300  # how long a replica may take to start (the start-up probe's allowance)


def http_probe(path: str, port: int, failures: int = 3, period: int = 5) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}


def stop_grace(settings: Settings) -> int:
    """Seconds from SIGTERM to SIGKILL: a request's whole deadline and the gRPC grace's margin past it,
    then that margin again for the batch lines that finished to be recorded and the process to exit."""
    return int(settings.request_timeout_seconds + 2 * TIMEOUT_GRACE_SECONDS)


def container(spec: Deployment, settings: Settings, grpc_port: bool = False) -> dict[str, Any]:
    """Knative (and KServe on it) route one port per container, so only a plain Deployment declares the
    gRPC port; the server listens on it everywhere (README, Kubernetes)."""
    ports = [{"name": "http1", "containerPort": spec.port, "protocol": "TCP"}]
    if grpc_port:
        ports.append({"name": "grpc", "containerPort": spec.grpc_port, "protocol": "TCP"})
    env = {**spec.env, "FNSERVE_GRPC_PORT": str(spec.grpc_port)}
    return {
        "name": spec.name,
        "image": spec.image,
        "ports": ports,
        # Replicas share batches, files and cached answers only through these: a pod must not start
        # without them (it would keep its batches to itself), so the keys are required.
        "env": [{"name": key, "value": value} for key, value in env.items()]
        + [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": spec.secret, "key": key}}}
            for name, key in SHARED.items()
        ],
        "resources": {
            "requests": {"cpu": spec.cpu, "memory": spec.memory},
            "limits": {"cpu": spec.cpu, "memory": spec.memory},
        },
        # Ready while models sleep (a request wakes them). The start-up probe holds the other two off
        # while the server starts: seconds on a quiet machine, but a busy node or a cold image cache
        # can take minutes, and a liveness probe with a fixed delay would kill a slow start for good.
        # Every second: on Knative (1.15 or later; older webhooks refuse the field) a start-up probe
        # turns off the queue-proxy's fast probing, so its period is added to every cold start.
        "startupProbe": http_probe("/livez", spec.port, failures=STARTUP_SECONDS, period=1),
        "readinessProbe": http_probe("/readyz", spec.port),
        "livenessProbe": http_probe("/livez", spec.port),
    }


def least_replicas(settings: Settings) -> int:
    """0: scaled to zero after the idle time. With models kept resident (FNSERVE_IDLE_RELEASE_SECONDS=0,
    "never"), one replica stays: that idle time written as the platform's scale-down would have been
    0 s, the quickest scale-down there is, the opposite of what the setting asks."""
    return 0 if settings.idle_release_seconds else 1


def knative(spec: Deployment, settings: Settings) -> dict[str, Any]:
    retention = f"{int(settings.idle_release_seconds)}s"  # keep the pod while its models would be warm
    annotations = {
        "autoscaling.knative.dev/min-scale": str(least_replicas(settings)),
        "autoscaling.knative.dev/max-scale": "4",
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/target": str(settings.autoscale_target),
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period": retention,
    }
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": spec.name},
        "spec": {
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {
                    "containerConcurrency": settings.max_concurrency,
                    "timeoutSeconds": settings.request_timeout_seconds,
                    "responseStartTimeoutSeconds": settings.request_timeout_seconds,
                    "containers": [container(spec, settings)],
                },
            }
        },
    }


def kserve(spec: Deployment, settings: Settings) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": spec.name,
            "annotations": {"serving.kserve.io/deploymentMode": "Serverless"},  # Knative mode
        },
        "spec": {
            "predictor": {
                "minReplicas": least_replicas(settings),
                "maxReplicas": 4,
                "scaleMetric": "concurrency",
                "scaleTarget": settings.autoscale_target,
                "containerConcurrency": settings.max_concurrency,
                "timeout": settings.request_timeout_seconds,
                "containers": [container(spec, settings)],
            }
        },
    }


def keda_http(spec: Deployment, settings: Settings) -> list[dict[str, Any]]:
    labels = {"app": spec.name}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": spec.name, "labels": labels},
        "spec": {
            "replicas": 0,  # the add-on scales it up on the first request
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": stop_grace(settings),
                    "containers": [container(spec, settings, grpc_port=True)],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "labels": labels},
        "spec": {
            "selector": labels,
            "ports": [
                {"name": "http", "port": spec.port, "targetPort": spec.port},
                {"name": "grpc", "port": spec.grpc_port, "targetPort": spec.grpc_port, "appProtocol": "grpc"},
            ],
        },
    }
    scaled = {
        "apiVersion": "http.keda.sh/v1alpha1",
        "kind": "HTTPScaledObject",
        "metadata": {"name": spec.name},
        "spec": {
            "hosts": [f"{spec.name}.example.com"],
            "scaleTargetRef": {
                "name": spec.name,
                "kind": "Deployment",
                "apiVersion": "apps/v1",
                "service": spec.name,
                "port": spec.port,
            },
            "replicas": {"min": least_replicas(settings), "max": 4},
            "scaledownPeriod": int(settings.idle_release_seconds),
            "scalingMetric": {"concurrency": {"targetValue": settings.autoscale_target}},
            # The interceptor holds a request while a replica starts: as long as the start-up probe
            # lets a start take. At 60 s, a start the probe allows (a node pulling the image) could
            # outlast it, and the first requests after a quiet period would fail at the interceptor.
            "timeouts": {
                "conditionWait": STARTUP_SECONDS,
                "responseHeader": settings.request_timeout_seconds,
            },
        },
    }
    return [deployment, service, scaled]


def bentocloud(spec: Deployment, settings: Settings) -> dict[str, Any]:
    return {
        "name": spec.name,
        "bento": f"{spec.name}:latest",
        "access_authorization": True,
        "envs": [{"name": key, "value": value} for key, value in spec.env.items()],
        # A BentoCloud secret of that name, mounted as environment variables, whose keys are SHARED's
        # variable names (README, Cluster manifests): the replicas' shared database and Redis.
        "secrets": [spec.secret],
        "services": {
            "fnserve": {
                "instance_type": "cpu.2",
                "scaling": {
                    "min_replicas": least_replicas(settings),
                    "max_replicas": 4,
                    "policy": {"scale_down_stabilization_window": int(settings.idle_release_seconds)},
                },
            },
            "generation": {
                "instance_type": "cpu.2",
                "scaling": {"min_replicas": least_replicas(settings), "max_replicas": 2},
            },
        },
    }


def secret(spec: Deployment) -> dict[str, Any]:
    """A template: the URLs are placeholders for the cluster's own PostgreSQL and Redis."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": spec.secret},
        "type": "Opaque",
        "stringData": {
            SHARED["FNSERVE_BATCH_DATABASE_URL"]: "postgresql://fnserve:CHANGE-ME@postgres:5432/fnserve",
            SHARED["FNSERVE_REDIS_URL"]: "redis://redis:6379/0",
        },
    }


def manifests(spec: Deployment | None = None, settings: Settings | None = None) -> dict[str, list[dict]]:
    spec, settings = spec or Deployment(), settings or get_settings()
    return {
        "knative-service.yaml": [knative(spec, settings)],
        "kserve-inferenceservice.yaml": [kserve(spec, settings)],
        "keda-http.yaml": keda_http(spec, settings),
        "bentocloud-deployment.yaml": [bentocloud(spec, settings)],
        "secret.yaml": [secret(spec)],
    }


def render(documents: list[dict]) -> str:
    header = "# Generated by deploy/generate.py: edit that, not this.\n"
    return header + yaml.safe_dump_all(documents, sort_keys=False)


def main() -> None:
    for name, documents in manifests().items():
        (HERE / name).write_text(render(documents))
        print(f"wrote deploy/{name}")


if __name__ == "__main__":
    main()
