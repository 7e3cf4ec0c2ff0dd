#!/usr/bin/env bash
# A Docker engine and a `python:3.11-slim` base image on a machine that reaches no image registry
# (../shared/FIELD-NOTES.md): dockerd from Debian's packages with overlay2 and host networking only (the
# default bridge mode would change the host's network), and a base image made with debootstrap and
# imported locally. Idempotent. Prints the DOCKER_HOST to use.
set -euo pipefail
STATE=${FNSERVE_DOCKER_STATE:-/var/lib/fnserve-docker}
export DOCKER_HOST=unix://$STATE/docker.sock
export PATH=/usr/bin:/usr/sbin:$PATH  # Debian's docker client, which has BuildKit

if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends docker.io debootstrap iptables >&2 \
      || { apt-get update >&2 && apt-get install -y --no-install-recommends docker.io debootstrap iptables >&2; }
  fi
  mkdir -p "$STATE"
  nohup dockerd --storage-driver overlay2 --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    --data-root "$STATE/root" --exec-root "$STATE/exec" --pidfile "$STATE/pid" -H "$DOCKER_HOST" \
    >"$STATE/dockerd.log" 2>&1 &
  for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
  docker info >/dev/null
fi

if ! docker image inspect python:3.11-slim >/dev/null 2>&1; then
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  if ! docker image inspect local/debian:bookworm >/dev/null 2>&1; then
    rootfs=$STATE/rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >&2
    tar -C "$rootfs" -c . | docker import - local/debian:bookworm >&2
    rm -rf "$rootfs"
  fi
  context=$(mktemp -d)
  cp /etc/ssl/certs/ca-certificates.crt "$context/"
  cat >"$context/Dockerfile" <<'DOCKERFILE'
FROM local/debian:bookworm
COPY ca-certificates.crt /usr/local/share/ca-certificates/host.crt
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
      ca-certificates curl && update-ca-certificates && rm -rf /var/lib/apt/lists/* \
    && rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED && ln -sf /usr/bin/python3 /usr/local/bin/python
# pip and uv inside the image trust this machine's certificate authority, as the host does.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt UV_NATIVE_TLS=1
DOCKERFILE
  docker build --network host -t python:3.11-slim "$context" >&2
  rm -rf "$context"
fi
echo "$DOCKER_HOST"
