"""GRPO: one readable loop, every phase named and timed.

```
prompts ──► rollout workers ──► samples(token ids, sampler logprobs, policy_version)
                                   │
              ┌────────────────────┼─────────────────────┐
              ▼                    ▼                     ▼
        grader pool          reference server      learner (old logprobs)
        rewards              ref logprobs          (no critic in GRPO)
              └────────────────────┬─────────────────────┘
                                   ▼
             advantages: rl.advantage_estimator (grpo | rloo | reinforce_pp | reinforce_pp_baseline)
                                   ▼
             learner update: rl.num_mini_batches optimizer steps × rl.num_epochs_per_step, PolicyLoss
                                   ▼
             weight sync learner ranks ──► every rollout worker (WeightHandle: object store or collective)
```

Old and reference log-probabilities stay on the roles that computed them (the batch carries references that the
learners fetch); the controller computes with rewards, lengths and metrics. The run around the loop (resume,
checkpoints, evaluation, summary, shutdown) is ``rlft/controller/run.py``.

| phase | waits for |
|---|---|
| generate | the batch sent to the rollout workers: at the step's start with the weights synced at the end of the previous step, or up to ``rl.max_staleness_steps`` steps earlier (asynchronous, ``rollouts.py``); each chunk goes to grading when done |
| grade | its chunk of samples (the phase's time is what grading adds after generation ends) |
| advantages | the rewards |
| old logprobs | the samples; only when a step makes several optimizer steps (``rl.old_logprobs``), otherwise the update's own forward pass gives them |
| reference | the samples |
| update | advantages, reference logprobs (and old logprobs); importance weights against the sampler's log-probabilities (``rl.off_policy_correction``) |
| sync | the update; asynchronous: only the learners' publishing, the workers load the weights behind their queued batches |

Departures from the paper (Shao et al. 2024, arXiv:2402.03300) are options: the loss aggregation
(``rl.loss_aggregation``; the paper's is ``seq_mean_token_mean``), the advantage scale (``rl.advantage_scale``;
``none`` is Dr. GRPO) and asymmetric clipping (``rl.clip_high``, DAPO). The KL term is in the loss, as in the paper.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from rlft.algorithms.advantages import (
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_to_token,
)
from rlft.config import Config
from rlft.controller.common import RunResult
from rlft.controller.rl_steps import (
    end_rl_step,
    make_policy_loss,
    proximal_logprobs,
    start_rl_job,
    with_aggregation_weights,
)
from rlft.controller.run import Run
from rlft.controller.step_metrics import mean_metrics, rollout_metrics, sync_metrics
from rlft.data.batch import policy_batch, trainable
from rlft.names import Phase
from rlft.timing import PhaseTimer


def critic_free_advantages(rewards_PG: torch.Tensor, response_BT: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Per-token advantages from each group's rewards, by ``rl.advantage_estimator``; 0 off the response."""
    rl = cfg.rl
    if rl.advantage_estimator == "grpo":
        return sequence_to_token(grpo_advantages(rewards_PG, rl.advantage_scale).flatten(), response_BT)
    if rl.advantage_estimator == "rloo":
        return sequence_to_token(rloo_advantages(rewards_PG).flatten(), response_BT)
    no_penalty_BT = torch.zeros_like(response_BT)  # the KL, when on, is a loss term here
    if rl.advantage_estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards_PG.flatten(), no_penalty_BT, response_BT, rl.gamma)
    return reinforce_pp_baseline_advantages(rewards_PG, no_penalty_BT, response_BT, rl.gamma)


def grpo(cfg: Config) -> RunResult:
    with Run(cfg) as run:
        job = start_rl_job(run)
        cfg, rl = run.cfg, run.cfg.rl
        loss = make_policy_loss(cfg, kl_in_loss=True)
        for step in run.steps():
            with run.recover_learners():  # a dead learner: all ranks restarted, steps since the checkpoint redone
                timer = PhaseTimer()
                step_start = time.perf_counter()
                indices = run.sampler.next_batch()

                samples, graded, staleness = job.rollouts.take(step, indices, timer)
                rewards_PG = torch.tensor(graded.rewards, dtype=torch.float32).view(len(indices), -1)

                with timer.phase(Phase.ADVANTAGES):
                    keep, filtered = trainable(samples, rl.mask_truncated)
                    batch = policy_batch(samples, torch.zeros(len(samples)), job.tokenizer.pad_token_id,
                                         cfg.rollout.max_model_len, keep).trimmed()
                    batch = dataclasses.replace(
                        batch, advantages_BT=critic_free_advantages(rewards_PG, batch.loss_weights_BT, cfg)
                    )
                # Log-probabilities stay on the learners and the reference server: the batch holds references.
                batch, logprob_gap = proximal_logprobs(job, batch, timer)
                if job.reference is not None:
                    with timer.phase(Phase.REFERENCE):
                        batch = dataclasses.replace(batch, ref_logprobs_BT=job.reference.keep_logprobs(batch))

                with timer.phase(Phase.UPDATE):
                    results = [
                        job.learners.train_step(with_aggregation_weights(mini, cfg), loss).metrics
                        for _ in range(rl.num_epochs_per_step)
                        for mini in batch.split(rl.num_mini_batches)
                    ]
                with timer.phase(Phase.SYNC):
                    sync = job.rollouts.publish(step)

                response_BT = batch.loss_weights_BT != 0
                end_rl_step(
                    job,
                    step,
                    {
                        **rollout_metrics(samples, job.prompts, rewards_PG.flatten(), step),
                        "reward/groups_all_equal": (rewards_PG.std(dim=1) == 0).float().mean().item(),
                        **sync_metrics(sync, logprob_gap, results),
                        **staleness,
                        **filtered,
                        **mean_metrics(results, "train/"),
                        **graded.metrics(),
                        **timer.metrics(),
                        "time/step_seconds": time.perf_counter() - step_start,
                        "perf/generate_tokens_per_second": response_BT.sum().item() / timer.seconds["generate"],
                        "train/batch_tokens": batch.num_tokens,
                        "train/update_tokens": batch.num_tokens * rl.num_epochs_per_step,
                        "perf/update_tokens_per_second":
                            batch.num_tokens * rl.num_epochs_per_step / timer.seconds["update"],
                    },
                )
        return run.finish()
