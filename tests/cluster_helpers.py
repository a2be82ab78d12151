"""Helpers for the cluster tests: a multi-node Ray cluster on this machine (launch/local_cluster.py), and finding
role actors' processes by the title Ray gives them (``ray::RolloutWorker.generate`` while generating)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from conftest import ROOT


@dataclass
class LocalCluster:
    proc: subprocess.Popen
    dir: Path
    env: dict[str, str]

    @property
    def job_server(self) -> str:
        return self.env["RAY_API_SERVER_ADDRESS"]

    @property
    def gcs_address(self) -> str:
        return self.env["RAY_ADDRESS"]

    def client_env(self) -> dict[str, str]:
        """The environment of a client: the token and addresses, without RAY_ADDRESS (rlft train would join)."""
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS")
        return env

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_local_cluster(worker_nodes: int, cpus_per_node: int) -> LocalCluster:
    """The cluster's directory is short and under /tmp: Ray's socket paths inside it must stay under 108 bytes."""
    from rlft.distributed.net import free_port

    work = Path(tempfile.mkdtemp(prefix="rlft-c", dir="/tmp"))
    log = (work / "cluster.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch/local_cluster.py"), "--dir", str(work), "--worker-nodes",
         str(worker_nodes), "--cpus-per-node", str(cpus_per_node), "--gcs-port", str(free_port()),
         "--dashboard-port", str(free_port())],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while "Ray cluster:" not in (work / "cluster.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("local cluster did not start:\n" + (work / "cluster.log").read_text()[-3000:])
        time.sleep(0.5)
    env = {}
    for line in (work / "env.sh").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return LocalCluster(proc, work, env)


def rlft_popen(*args: str, cwd: Path, env: dict[str, str] | None = None, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rlft.cli", *args], cwd=cwd, env=env or {**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
    )


def steps_logged(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    records = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "reward/mean" in record:
            records.append(record)
    return records


def wait_until(predicate, what: str, timeout_s: float = 300, proc: subprocess.Popen | None = None, log: Path = None):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path | None) -> str:
    return log.read_text()[-4000:] if log is not None and log.exists() else ""


def _processes_under(root: subprocess.Popen) -> list[psutil.Process]:
    """``root`` and its descendants: a job's driver and the Ray cluster it started (or a local cluster's launcher and
    its nodes). Tests that run side by side (``pytest -n``) each look only in their own job's tree."""
    try:
        parent = psutil.Process(root.pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def busy_actor_pid(title: str, root: subprocess.Popen, timeout_s: float = 120) -> int:
    """The PID of a process under ``root`` whose title starts with ``title`` (Ray titles an actor's process
    ``ray::Class.method`` while it runs that method), polled every 10 ms."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in _processes_under(root):
            try:
                cmdline = proc.cmdline()
            except psutil.Error:
                continue
            if cmdline and cmdline[0].startswith(title):
                return proc.pid
        time.sleep(0.01)
    raise AssertionError(f"no process titled {title!r} within {timeout_s} s")


def kill_actor_during(busy: str, victim: str, root: subprocess.Popen) -> int:
    """Once a process titled ``busy`` runs under ``root`` (e.g. ``ray::RolloutWorker.generate``: a step is under
    way), SIGKILL the one titled ``victim`` (it may be the same). Returns the victim's PID."""
    busy_actor_pid(busy, root)
    pid = busy_actor_pid(victim, root, timeout_s=5)
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_own_learner_in_train_step(proc: subprocess.Popen) -> int:
    """SIGKILL a learner rank of ``proc``'s own Ray cluster (the driver starts the raylet, whose children the actors
    are) while it runs ``train_step``. Returns its PID."""
    return kill_actor_during("ray::LearnerWorker.train_step", "ray::LearnerWorker.train_step", proc)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def listeners(root: subprocess.Popen) -> set[tuple[str, int, str]]:
    """(address, port, title of the process listening there), over ``root`` and its descendants."""
    found = set()
    for process in _processes_under(root):
        try:
            title = (process.cmdline() or [""])[0]
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, title))
        except psutil.Error:
            continue
    return found
