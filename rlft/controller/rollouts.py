"""The samples of each RL step: generated in step with training, or ahead of it (asynchronous RL).

``rl.max_staleness_steps`` = k. The learners' policy version before step s is s − 1 (version v: the weights after
v updates). Step s trains on a sample of version v only if (s − 1) − v <= k; the gap is the sample's staleness.

k = 0, synchronous: step s sends its prompts to the rollout workers at its start, with version s − 1, and waits.

k >= 1: at the end of step s the learners publish version s, every worker is sent it without waiting, and then
the batches of steps s + 1 .. s + 1 + k not yet sent are sent. A worker runs its calls in the order they arrive,
so those batches are generated with version s (or a newer one, on a worker that replaced a dead one), and step
s + 1 + j trains its batch at staleness j <= k. The workers thus generate while the learners update (k = 1):

    rollout workers │ batches 1, 2 @v0 │ batch 3 @v1      │ batch 4 @v2      │
    learners        │  (batch 1)       │ update 1 → v1    │ update 2 → v2    │ update 3 (batch 3 @v1) ...

A batch that comes back staler than k (the order above rules it out; the check keeps the promise) is generated
again with the current weights, and its samples are counted as dropped. Prompts keep their order (the sampler is
read ahead on a copy, so checkpoints hold the position of the last trained batch), and a prompt's samples are
seeded by prompt and policy version, as in synchronous mode.

What survives: a rollout worker that dies with batches queued is replaced and its chunks are generated again by
the replacement, with the newest weights (each chunk comes back once); ``rlft scale`` moves a removed worker's
chunks to the others. After a learner restart or a resume the batches in flight are dropped and generation starts
again from the restored weights: a resumed asynchronous run trains the same prompts in the same order, but its
first k batches are fresher than the uninterrupted run's, so its metrics differ from there on (at k = 0 a resume
is exact).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import ray
import torch

from rlft.algorithms.shaping import informative_groups, shape_rewards
from rlft.config import Config, overlong_max_tokens
from rlft.controller.run import Run
from rlft.data.prompts import PromptSet
from rlft.distributed.actors import Submitted, payload_bytes
from rlft.distributed.weight_sync import SyncStats
from rlft.envs.config import multi_turn
from rlft.graders import GradeRequest, GraderPool
from rlft.graders.pool import GradeResult
from rlft.learner.group import LearnerGroup
from rlft.names import Phase
from rlft.rollout import Sample
from rlft.rollout.group import RolloutGroup
from rlft.timing import PhaseTimer


@dataclass
class _Sent:
    indices: list[int]
    submitted: Submitted


class Rollouts:
    """A step's samples (``take``) and the weights after its update (``publish``), for every RL controller: the
    prompts go to the ``rollout`` workers, their samples to the ``graders``, and the ``learners`` publish the
    weights the workers take next. ``run``'s sampler says which prompts the coming steps train on."""

    def __init__(self, cfg: Config, run: Run, prompts: PromptSet, rollout: RolloutGroup, graders: GraderPool,
                 learners: LearnerGroup):
        self.cfg, self.run, self.prompts = cfg, run, prompts
        self.rollout, self.graders, self.learners = rollout, graders, learners
        self.max_staleness = cfg.rl.max_staleness_steps
        self._sent: dict[int, _Sent] = {}  # step -> its batch, sent ahead of the step
        self._dropped = 0
        self._one_node = cfg.ray.local_mode or sum(node["Alive"] for node in ray.nodes()) == 1
        rollout.queued_ahead = self.asynchronous

    @property
    def asynchronous(self) -> bool:
        return self.max_staleness > 0

    def take(self, step: int, indices: list[int], timer: PhaseTimer) -> tuple[list[Sample], GradeResult, dict]:
        """Step ``step``'s samples of the prompts ``indices`` (in prompt order), their grades, and the staleness
        metrics. Waits for the batch sent ahead, or sends it now."""
        ahead = len(self._sent)
        sent = self._sent.pop(step, None)
        if sent is None or sent.indices != indices:
            sent = _Sent(indices, self._send(indices, self._borrowed_threads()))
        samples, graded = self._collect_and_grade(sent.indices, sent.submitted, timer)
        staleness = staleness_of(samples, step)
        if max(staleness) > self.max_staleness:  # a worker served older weights than promised: generate afresh
            self._dropped += len(samples)
            samples, graded = self._collect_and_grade(indices, self._send(indices, self._borrowed_threads()), timer)
        metrics = {}
        if self.cfg.rl.dynamic_sampling:
            samples, graded, metrics = self._informative(step, samples, graded, timer)
        staleness = staleness_of(samples, step)
        metrics = {
            **metrics,
            "async/staleness_mean": sum(staleness) / len(staleness),
            "async/staleness_max": max(staleness),
            "async/stale_samples_dropped": self._dropped,
            "async/batches_ahead": ahead,
            "async/batch_bytes": payload_bytes(samples),
        }
        if multi_turn(self.cfg.envs):
            metrics.update(env_metrics(samples))
        if self.cfg.rl.overlong_buffer:
            penalties = torch.tensor([s.overlong_penalty for s in samples], dtype=torch.float32)
            metrics["reward/overlong_penalty_mean"] = penalties.mean().item()
            metrics["reward/overlong_fraction"] = (penalties < 0).float().mean().item()
        return samples, graded, metrics

    def _informative(self, step: int, samples: list[Sample], graded: GradeResult,
                     timer: PhaseTimer) -> tuple[list[Sample], GradeResult, dict[str, float]]:
        """DAPO's dynamic sampling (``rl.dynamic_sampling``): the step's groups whose rewards are not all equal, and
        more rounds of ``rl.num_prompts_per_step`` prompts until there are that many or the rounds' cap is reached;
        the groups dropped then fill the batch in the order they came. A round's prompts are drawn at random (seeded
        by the run's seed, the step and the round, so a resumed run draws them again) and generated with the
        current weights. Metrics: the extra rounds, the prompts generated, and the filling groups."""
        cfg, rl = self.cfg, self.cfg.rl
        wanted, per = rl.num_prompts_per_step, rl.num_samples_per_prompt
        rounds = [(samples, graded)]
        while True:
            rewards_PG = torch.tensor([r for _, g in rounds for r in g.rewards]).view(-1, per)
            keep = informative_groups(rewards_PG).tolist()
            if sum(keep) >= wanted or len(rounds) > rl.dynamic_sampling_max_rounds:
                break
            num_prompts = len(self.prompts.items)
            extra = np.random.default_rng([cfg.trainer.seed, step, len(rounds)]).choice(
                num_prompts, wanted, replace=num_prompts < wanted).tolist()
            rounds.append(self._collect_and_grade(extra, self._send(extra, self._borrowed_threads()), timer))
        groups = [g for g, informative in enumerate(keep) if informative][:wanted]
        filling = [g for g, informative in enumerate(keep) if not informative][: wanted - len(groups)]
        rows = [g * per + i for g in groups + filling for i in range(per)]
        every_sample = [s for round_samples, _ in rounds for s in round_samples]
        metrics = {"dynamic/rounds": len(rounds) - 1, "dynamic/prompts_generated": len(rounds) * wanted,
                   "dynamic/groups_filled": len(filling)}
        return ([every_sample[r] for r in rows], GradeResult.concat([g for _, g in rounds]).select(rows), metrics)

    def publish(self, step: int) -> SyncStats:
        """The learners' weights after step ``step``'s update become version ``step`` on every worker. Synchronous:
        returns when every worker holds them. Asynchronous: returns once they are published, and sends the coming
        steps' batches behind them."""
        if not self.asynchronous:
            return self.rollout.sync_from(self.learners, step)
        stats = self.rollout.sync_from(self.learners, step, wait_applied=False)
        self.send_ahead(step)
        return stats

    def send_ahead(self, step: int) -> None:
        """After version ``step`` was sent: send the batches of steps ``step`` + 1 .. ``step`` + 1 + k (within the
        run) that are not on their way yet. Nothing in synchronous mode."""
        if not self.asynchronous:
            return
        run = self.run
        sampler = copy.deepcopy(run.sampler)  # the run's own sampler moves only when a step takes its batch
        for future in range(step + 1, min(step + 1 + self.max_staleness, run.total_steps) + 1):
            indices = sampler.next_batch()
            if future not in self._sent:
                self._sent[future] = _Sent(indices, self._send(indices))

    def restart(self, step: int) -> None:
        """After the learners went back to step ``step`` (a resume or a learner restart): the batches on their way
        were sent for other weights and prompts, so they are dropped, and sending starts again from ``step``."""
        self._sent.clear()
        self.send_ahead(step)

    def _borrowed_threads(self) -> int:
        """Compute threads of a worker's generate call in synchronous mode on one node
        (``rollout.borrow_idle_cores``): the node's cores shared among the workers, since the learners wait
        meanwhile; 0 (the worker's own share) otherwise."""
        cfg = self.cfg
        if self.asynchronous or not cfg.rollout.borrow_idle_cores or cfg.ray.local_mode or not self._one_node:
            return 0
        return max(1, len(os.sched_getaffinity(0)) // self.rollout.num_workers)

    def _send(self, indices: list[int], num_threads: int = 0) -> Submitted:
        """Send the prompts ``indices`` to the rollout workers (``rl.num_samples_per_prompt`` samples each, in
        ``rollout.chunks_per_worker`` calls per worker, ``num_threads`` compute threads each if > 0);
        ``_collect_and_grade`` waits for them."""
        cfg, prompts = self.cfg, self.prompts
        if multi_turn(cfg.envs):  # multi-turn: the workers render each trajectory themselves, from the data row
            rows = [{"messages": prompts.items[i].messages, **prompts.items[i].extra} for i in indices]
        else:
            rows = [prompts.token_ids[i] for i in indices]
        return self.rollout.submit(
            rows,
            # trainer.seed shifts the sampling seed too, so one seed changes every random choice of a run.
            dataclasses.replace(cfg.rollout.sampling, seed=cfg.rollout.sampling.seed + cfg.trainer.seed),
            cfg.rl.num_samples_per_prompt,
            indices,
            cfg.rollout.chunks_per_worker,
            num_threads,
        )

    def _collect_and_grade(self, indices: list[int], submitted: Submitted,
                           timer: PhaseTimer) -> tuple[list[Sample], GradeResult]:
        """The samples of the sent prompts ``indices`` (in prompt order) and their grades. Each chunk goes to the
        grader pool as soon as it is generated, so two phases are timed: ``generate``, until the last sample
        exists, and ``grade``, what grading adds after that (the part not hidden behind generation)."""
        cfg = self.cfg
        chunks, handles = {}, {}
        with timer.phase(Phase.GENERATE):
            for first, samples in self.rollout.chunks(submitted):
                chunks[first] = samples
                handles[first] = self.graders.submit(grade_requests(samples, self.prompts))
        with timer.phase(Phase.GRADE):
            order = sorted(chunks)
            _check_complete([s for first in order for s in chunks[first]], indices, cfg.rl.num_samples_per_prompt)
            graded = GradeResult.concat([self.graders.collect(handles[first]) for first in order])
            graded.check_error_rate(cfg.graders.max_error_rate)
        samples = [sample for first in order for sample in chunks[first]]
        rewards_S, penalties_S = shape_rewards(
            torch.tensor(graded.rewards, dtype=torch.float64),
            torch.tensor([s.env_reward for s in samples], dtype=torch.float64),
            torch.tensor([s.num_policy_tokens for s in samples]),
            overlong_max_tokens(cfg), cfg.rl.overlong_buffer, cfg.rl.overlong_penalty,
        )
        for sample, penalty in zip(samples, penalties_S.tolist()):
            sample.overlong_penalty = penalty
        graded = dataclasses.replace(graded, rewards=rewards_S.tolist())
        return samples, graded


def staleness_of(samples: list[Sample], step: int) -> list[int]:
    """Each sample's staleness at step ``step``: the policy versions between it and the learners."""
    return [step - 1 - s.policy_version for s in samples]


def env_metrics(samples: list[Sample]) -> dict[str, float]:
    """Multi-turn: turns, tool calls, environment rewards and failures of a step's trajectories."""
    num, steps = len(samples), sum(s.num_turns for s in samples)  # one environment step per policy turn
    metrics = {
        "envs/steps": steps,
        "envs/turns_mean": steps / num,
        "envs/tool_calls_mean": sum(s.num_tool_calls for s in samples) / num,
        "envs/reward_mean": sum(s.env_reward for s in samples) / num,
        "envs/observation_tokens_mean": sum(s.response_mask.count(0) for s in samples if s.response_mask) / num,
    }
    for failure, name in (("error", "errors"), ("timeout", "timeouts"), ("invalid", "invalid")):
        metrics[f"envs/{name}"] = sum(s.env_failure == failure for s in samples)
    return metrics


def grade_requests(samples: list[Sample], prompts: PromptSet) -> list[GradeRequest]:
    """A multi-turn sample is graded on its last turn, with the transcript before it as the prompt."""
    return [
        GradeRequest(s.messages[:-1] if s.messages else prompts.items[s.prompt_index].messages, s.response_text,
                     prompts.items[s.prompt_index].extra)
        for s in samples
    ]


def _check_complete(samples: list[Sample], indices: list[int], per_prompt: int) -> None:
    """Every prompt's samples exactly once, in prompt order (a redone chunk must not add or drop any)."""
    got = [s.prompt_index for s in samples]
    want = [i for i in indices for _ in range(per_prompt)]
    if got != want:
        raise RuntimeError(f"rollout returned {len(got)} samples for {len(want)} expected, or out of order")
