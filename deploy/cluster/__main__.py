"""`python -m deploy.cluster up|down`: what `make cluster` and `make cluster-down` run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy.cluster.cluster import Cluster


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.cluster")
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument(
        "--dir", type=Path, default=Path(".cluster"), help="state, logs and each replica's home"
    )
    parser.add_argument("--port", type=int, default=8000, help="the load balancer's HTTP port")
    parser.add_argument("--grpc-port", type=int, default=0, help="its gRPC port; 0 = the HTTP port + 1")
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    folder = args.dir.resolve()  # HAProxy's stats socket needs an absolute path
    running = Cluster.load(folder)
    if running is not None and not any(part.running() for part in running.parts.values()):
        running.down()  # what a machine's restart or a kill left: nothing of it runs
        running = None
    if args.action == "down":
        if running is None:
            print(f"no cluster in {args.dir}")
            return 0
        running.down()
        print("cluster stopped")
        return 0
    if running is not None:
        print(f"a cluster already runs from {args.dir} at {running.url}: `make cluster-down` first")
        return 1
    cluster = Cluster(folder, args.port, args.grpc_port or args.port + 1)
    try:
        cluster.up(args.replicas)
    except BaseException:
        cluster.down()
        raise
    for replica in cluster.replicas:
        log = args.dir / replica.name / "server.log"
        print(f"  {replica.name}: {replica.url} (gRPC 127.0.0.1:{replica.grpc_port}), log {log}")
    print(f"  PostgreSQL {cluster.database_url}, Redis {cluster.redis_url}")
    grpc = f"127.0.0.1:{cluster.grpc_port}"
    print(f"fnserve cluster: {cluster.url} (gRPC {grpc}), {args.replicas} replicas behind HAProxy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
