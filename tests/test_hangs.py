"""Nothing hangs silently: a stopped rollout worker or learner fails the job within ``ray.call_timeout_s``, the
error names the phase and the actor, and every actor's stacks are in ``<output_dir>/stacks/``.

Each test runs the two-step GRPO job of tests/test_loopback.py with a 15 s call deadline and stops one actor
(SIGSTOP, as a process stuck in the kernel or a debugger would be) once every role has started, so the first step
is the one that waits. A stopped process cannot run its SIGUSR1 stack handler; its stacks are read with py-spy
(``rlft/distributed/stacks.py``), which leaves it stopped.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from cluster_helpers import busy_actor_pid, rlft_popen, wait_until
from test_loopback import tiny_grpo_args

# About 70 s each on 2 cores: Ray, two learners, a vLLM engine, then the deadline.
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]

CALL_TIMEOUT_S = 15
# Beyond the deadline: the steps before the stopped actor's call, the stack dump.
MARGIN_S = 45


def _stop_and_expect(tmp_path, victim_title: str, phase: str, role: str):
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = rlft_popen(*tiny_grpo_args(out, f"ray.call_timeout_s={CALL_TIMEOUT_S}"), cwd=tmp_path, log=log)
    pid = None
    try:
        # The grader worker starts last: by then the learners are set up and the rollout worker's engine is up.
        busy_actor_pid("ray::GraderWorker", timeout_s=300)
        pid = busy_actor_pid(victim_title, timeout_s=5)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_until(lambda: "overran its deadline" in log.read_text(), "the phase's deadline error",
                   timeout_s=CALL_TIMEOUT_S + MARGIN_S, proc=proc, log=log)
        assert time.monotonic() - stopped_at < CALL_TIMEOUT_S + MARGIN_S
        os.kill(pid, signal.SIGCONT)  # let the job shut down without waiting out the stopped actor
        assert proc.wait(timeout=180) != 0
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    error = next(line for line in text.splitlines() if "overran its deadline" in line)
    print(error)
    assert f"phase {phase} overran its deadline" in error
    assert re.search(rf"{role} actor \d+ \(pid {pid}, stopped\) did not answer within {CALL_TIMEOUT_S} s", error)
    assert f"stacks of every actor in {out / 'stacks'}" in error
    dumps = {path.name: path.read_text() for path in (out / "stacks").glob("*.txt")}
    mine = [name for name in dumps if name.startswith(f"{role}-") and name.endswith(f"-{pid}.txt")]
    assert mine, sorted(dumps)
    assert 'File "' in dumps[mine[0]], dumps[mine[0]][:2000]
    # The other actors, running, wrote theirs from their SIGUSR1 handler.
    others = [text for name, text in dumps.items() if name not in mine]
    assert others and all('File "' in text for text in others), sorted(dumps)
    return error


def test_a_stopped_rollout_worker_fails_the_generate_phase(tmp_path):
    _stop_and_expect(tmp_path, "ray::RolloutWorker", "generate", "rollout")


def test_a_stopped_learner_fails_the_old_logprobs_phase(tmp_path):
    _stop_and_expect(tmp_path, "ray::LearnerWorker", "old_logprobs", "learners")
