"""A Ray cluster of several nodes on this one machine, for trying rlft's cluster features without a cluster.

    python launch/local_cluster.py --worker-nodes 1 --cpus-per-node 2 &    # until Ctrl-C / SIGTERM
    eval "$(cat /tmp/rlft-cluster/env.sh)"                                   # auth token, addresses
    rlft submit configs/grpo_tiny.yaml --follow
    rlft scale <job id> --rollout-workers 2

A head node and ``--worker-nodes`` worker nodes, each its own raylet with ``--cpus-per-node`` CPUs (Ray's own
multi-node test harness, ``ray.cluster_utils.Cluster``). Safe by default: every service binds to 127.0.0.1, and
Ray's token authentication is on (``--auth token``; the token is generated into ``<dir>/auth_token``, readable only
by you). The variables a client needs are written to ``<dir>/env.sh``. Stopping this process stops the cluster.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker-nodes", type=int, default=1)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--gcs-port", type=int, default=6390)
    parser.add_argument("--dashboard-port", type=int, default=8265, help="the job server (Ray dashboard)")
    parser.add_argument("--dir", default="/tmp/rlft-cluster",
                        help="auth token, env.sh and Ray's session files (keep it short: Ray's socket paths in it "
                        "must stay under 108 bytes)")
    parser.add_argument("--auth", choices=["token", "disabled"], default="token")
    args = parser.parse_args()

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        # Keeps Ray's node addresses on loopback (otherwise Ray picks the machine's external address).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": args.auth,
        "RAY_ADDRESS": f"127.0.0.1:{args.gcs_port}",
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{args.dashboard_port}",
    }
    if args.auth == "token":
        token = out / "auth_token"
        if not token.exists() or not token.read_text().strip():
            token.write_text(secrets.token_hex(32))
            token.chmod(0o600)
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ.update({k: v for k, v in env.items() if k != "RAY_ADDRESS"})
    # Jobs' entrypoints (`python -m rlft.cli ...`) run with the Python that started the cluster.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    (out / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))

    from ray.cluster_utils import Cluster

    node = {"num_cpus": args.cpus_per_node, "num_gpus": args.gpus_per_node, "object_store_memory": 1 << 30}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node,
            "gcs_server_port": args.gcs_port,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": args.dashboard_port,
            # Ray's fixed default (52365) is taken when another Ray instance runs on this machine; the job server
            # then finds no agent to run jobs on.
            "dashboard_agent_listen_port": _free_port(),
            "temp_dir": str(out / "r"),
        },
    )
    for _ in range(args.worker_nodes):
        cluster.add_node(**node, node_ip_address="127.0.0.1")
    # The job server gives each job's driver the address recorded in its temp dir (Ray's harness records it only
    # in the default one, where another Ray instance of this machine may have recorded its own).
    from ray._private.utils import write_ray_address

    write_ray_address(cluster.gcs_address, str(out / "r"))
    print(
        f"Ray cluster: 1 head + {args.worker_nodes} worker node(s), {args.cpus_per_node} CPUs each; "
        f"job server {env['RAY_API_SERVER_ADDRESS']}, auth {args.auth}\nclient variables: {out / 'env.sh'}",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    cluster.shutdown()
    print("Ray cluster stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
