"""Nothing hangs silently: a stopped rollout worker or learner fails the job within ``ray.call_timeout_s``, the
error names the phase and the actor, and every actor's stacks are in ``<output_dir>/stacks/``.

Each test runs the two-step GRPO job of tests/test_loopback.py with an 8 s call deadline and stops one actor
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
from rlft import timing
from rlft.names import Phase
from rlft.timing import PhaseTimeoutError, PhaseTimer
from test_loopback import tiny_grpo_args


CALL_TIMEOUT_S = 8
# Beyond the deadline: the steps before the stopped actor's call, the stack dump.
MARGIN_S = 45


def _stop_and_expect(tmp_path, victim_title: str, phase: str, role: str):
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    # 16 prompts × 4 samples of up to 32 tokens: step 1's generation lasts long enough to be seen running.
    longer = ["rl.num_prompts_per_step=16", "trainer.global_batch_size=64", "rollout.sampling.max_new_tokens=32",
              "rollout.max_model_len=96"]
    proc = rlft_popen(*tiny_grpo_args(out, f"ray.call_timeout_s={CALL_TIMEOUT_S}", *longer), cwd=tmp_path, log=log)
    pid = None
    try:
        # The roles start at once; once the rollout worker generates, every role is up and step 1 is under way
        # (this job has no evaluation), so the victim's next call is inside a phase.
        busy_actor_pid("ray::RolloutWorker.generate", proc, timeout_s=300)
        pid = busy_actor_pid(victim_title, proc, timeout_s=5)
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
    # The stopped actor is named; its peers, waiting on it in a collective, may be named beside it.
    assert re.search(rf"{role} actor \d+ \(pid {pid}, stopped\)[^;]* did not answer within {CALL_TIMEOUT_S} s", error)
    assert f"stacks of every actor in {out / 'stacks'}" in error
    assert f"rlft: job stopped: phase {phase} overran its deadline" in text  # one line from the CLI, rc 1
    dumps = {path.name: path.read_text() for path in (out / "stacks").glob("*.txt")}
    mine = [name for name in dumps if name.startswith(f"{role}-") and name.endswith(f"-{pid}.txt")]
    assert mine, sorted(dumps)
    assert 'File "' in dumps[mine[0]], dumps[mine[0]][:2000]
    # The other actors, running, wrote theirs from their SIGUSR1 handler.
    others = [text for name, text in dumps.items() if name not in mine]
    assert others and all('File "' in text for text in others), sorted(dumps)
    return error


def test_calls_inside_a_phase_get_the_deadline_and_an_overrun_names_the_phase():
    timer = PhaseTimer()
    timing.set_call_timeout(7.0)
    try:
        assert timing.call_timeout_s() is None  # outside phases: start-up, evaluation, checkpoints
        with timer.phase(Phase.UPDATE):
            assert timing.call_timeout_s() == 7.0
        with pytest.raises(PhaseTimeoutError, match=r"^phase update overran its deadline: learners actor 1 did not "
                                                     r"answer within 7 s; no actor stacks written$") as err:
            with timer.phase(Phase.UPDATE):
                raise TimeoutError("learners actor 1 did not answer within 7 s")
        assert err.value.phase == "update" and "update" in timer.seconds
        with pytest.raises(ValueError):  # other errors pass through unchanged
            with timer.phase(Phase.UPDATE):
                raise ValueError("not a timeout")
    finally:
        timing.set_call_timeout(None)
    with pytest.raises(TimeoutError) as err:  # no deadline configured (a role actor's own clock): left as it is
        with timer.phase(Phase.UPDATE):
            raise TimeoutError("inside an actor")
    assert not isinstance(err.value, PhaseTimeoutError)


# About 35 s on 2 cores: Ray, two learners, a vLLM engine (about 20 s), then the 8 s deadline and the stacks.
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_a_stopped_rollout_worker_fails_the_generate_phase(tmp_path):
    """Over 60 s beside the other worker's tests: a whole job starts (Ray, two learners, a vLLM engine), then the
    8 s deadline runs out and every actor's stacks are read."""
    _stop_and_expect(tmp_path, "ray::RolloutWorker", "generate", "rollout")


# About 35 s on 2 cores: Ray, two learners, a vLLM engine (about 20 s), then the 8 s deadline and the stacks.
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_a_stopped_learner_fails_the_update_phase(tmp_path):
    """Over 60 s beside the other worker's tests: a whole job starts (Ray, two learners, a vLLM engine), then the
    8 s deadline runs out and every actor's stacks are read."""
    # One optimizer step per batch: the update is the step's first call to the learners (no old-logprob pass).
    _stop_and_expect(tmp_path, "ray::LearnerWorker", "update", "learners")
