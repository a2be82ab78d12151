"""PPO with a critic: one readable loop, every phase named and timed.

```
prompts ──► rollout workers ──► samples(token ids, sampler logprobs, policy_version)
                                   │
        ┌──────────────────┬───────┴──────────┬─────────────────────┐
        ▼                  ▼                  ▼                     ▼
   grader pool      reference server    learner (old logprobs)   critic (values)
   rewards          ref logprobs
        └──────────────────┴───────┬──────────┴─────────────────────┘
                                   ▼
     token rewards (score on the last response token, minus a KL penalty per token when rl.kl_mode=reward)
                                   ▼
     GAE advantages and returns (rlft.algorithms.gae), advantages whitened over the step's response tokens
                                   ▼
     policy update (PolicyLoss) and critic update (ValueLoss), rl.num_mini_batches × rl.num_epochs_per_step
                                   ▼
     weight sync learner ranks ──► every rollout worker (WeightHandle: object store or collective)
```

Old and reference log-probabilities stay on the roles that computed them (the batch carries references); with the
default ``rl.kl_mode: reward`` the KL penalty is part of the rewards GAE runs on, so the controller fetches them
for that one computation, as it fetches the critic's values. The run around the loop is ``rlft/controller/run.py``.

| phase | waits for |
|---|---|
| generate | the weights synced at the end of the previous step; each chunk goes to grading when done |
| grade | its chunk of samples (the phase's time is what grading adds after generation ends) |
| reference, old logprobs, values | the samples |
| advantages | rewards, values (and reference logprobs for the KL penalty) |
| update | advantages and returns |
| sync | the policy update |

Follows Ouyang et al. 2022 (arXiv:2203.02155) as commonly implemented for language models: the KL to the reference
is a per-token reward penalty by default (``rl.kl_mode``), the critic starts from the policy's checkpoint with a
fresh scalar head, and advantages are whitened per step.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from rlft.algorithms.advantages import gae
from rlft.algorithms.kl import kl_estimate
from rlft.algorithms.policy_loss import ValueLoss
from rlft.data.batch import ValueBatch
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
from rlft.distributed.remote_rows import RemoteRows
from rlft.names import Phase
from rlft.timing import PhaseTimer


def ppo(cfg: Config) -> RunResult:
    with Run(cfg) as run:
        job = start_rl_job(run, with_critic=True)
        cfg, rl = run.cfg, run.cfg.rl
        policy_loss = make_policy_loss(cfg, kl_in_loss=rl.kl_mode == "loss")
        value_loss = ValueLoss(clip=rl.value_clip)
        for step in run.steps():
            with run.recover_learners():  # a dead learner: all ranks restarted, steps since the checkpoint redone
                timer = PhaseTimer()
                step_start = time.perf_counter()
                indices = run.sampler.next_batch()

                samples, graded, staleness = job.rollouts.take(step, indices, timer)
                rewards_S = torch.tensor(graded.rewards, dtype=torch.float32)
                keep, filtered = trainable(samples, rl.mask_truncated)
                batch = policy_batch(samples, torch.zeros_like(rewards_S), job.tokenizer.pad_token_id,
                                     cfg.rollout.max_model_len, keep).trimmed()
                response_BT = batch.loss_weights_BT != 0

                # Log-probabilities stay on the learners and the reference server: the batch holds references.
                batch, logprob_gap = proximal_logprobs(job, batch, timer)
                with timer.phase(Phase.VALUES):
                    values_BT = job.critic.compute_values(batch)
                if job.reference is not None:
                    with timer.phase(Phase.REFERENCE):
                        batch = dataclasses.replace(batch, ref_logprobs_BT=job.reference.keep_logprobs(batch))

                with timer.phase(Phase.ADVANTAGES):
                    rewards_BT = _token_rewards(rewards_S, response_BT)
                    kl_penalty_BT = torch.zeros_like(rewards_BT)
                    if job.reference is not None and rl.kl_mode == "reward":
                        # The KL penalty is part of the rewards GAE runs on, here: the one place the controller
                        # fetches log-probabilities (with rl.kl_mode=loss the learners apply the KL themselves).
                        kl_BT = kl_estimate(resolved(batch.old_logprobs_BT), resolved(batch.ref_logprobs_BT),
                                            rl.kl_kind)
                        kl_penalty_BT = rl.kl_coef * kl_BT * response_BT
                    advantages_BT, returns_BT = gae(rewards_BT - kl_penalty_BT, values_BT, response_BT, rl.gamma,
                                                    rl.gae_lambda)
                    batch = dataclasses.replace(batch, advantages_BT=_whiten(advantages_BT, response_BT))
                    critic_batch = ValueBatch(
                        input_ids_BT=batch.input_ids_BT,
                        attention_mask_BT=batch.attention_mask_BT,
                        position_ids_BT=batch.position_ids_BT,
                        loss_weights_BT=batch.loss_weights_BT,
                        old_values_BT=values_BT,
                        returns_BT=returns_BT,
                    )

                with timer.phase(Phase.UPDATE):
                    policy_results, critic_results = [], []
                    for _ in range(rl.num_epochs_per_step):
                        for mini in batch.split(rl.num_mini_batches):
                            policy_mini = with_aggregation_weights(mini, cfg)
                            policy_results.append(job.learners.train_step(policy_mini, policy_loss).metrics)
                        for mini in critic_batch.split(rl.num_mini_batches):
                            critic_mini = with_aggregation_weights(mini, cfg)
                            critic_results.append(job.critic.train_step(critic_mini, value_loss).metrics)
                with timer.phase(Phase.SYNC):
                    sync = job.rollouts.publish(step)

                end_rl_step(
                    job,
                    step,
                    {
                        **rollout_metrics(samples, job.prompts, rewards_S, step),
                        "reward/kl_penalty_mean": kl_penalty_BT.sum(1).mean().item(),
                        **sync_metrics(sync, logprob_gap, policy_results),
                        **staleness,
                        **filtered,
                        **mean_metrics(policy_results, "train/"),
                        **mean_metrics(critic_results, "critic/"),
                        **graded.metrics(),
                        **timer.metrics(),
                        "time/step_seconds": time.perf_counter() - step_start,
                        "perf/generate_tokens_per_second": response_BT.sum().item() / timer.seconds["generate"],
                        "train/batch_tokens": batch.num_tokens,
                        # The policy and the critic each take the batch.
                        "train/update_tokens": 2 * batch.num_tokens * rl.num_epochs_per_step,
                        "perf/update_tokens_per_second":
                            2 * batch.num_tokens * rl.num_epochs_per_step / timer.seconds["update"],
                    },
                )
        return run.finish()


def resolved(rows) -> torch.Tensor:
    """A per-token tensor the batch holds, fetched if it is a reference (``RemoteRows``)."""
    return rows.resolve() if isinstance(rows, RemoteRows) else rows


def _token_rewards(rewards_S: torch.Tensor, response_BT: torch.Tensor) -> torch.Tensor:
    """Each sample's score on its last response token, 0 elsewhere (an outcome reward); a row without response
    tokens (a masked sample) gets none."""
    positions_T = torch.arange(response_BT.shape[1])
    last_S = torch.where(response_BT, positions_T, -1).max(dim=1).values
    rewards_BT = torch.zeros(response_BT.shape, dtype=torch.float32)
    rewards_BT[torch.arange(len(rewards_S)), last_S.clamp(min=0)] = torch.where(last_S >= 0, rewards_S, 0.0)
    return rewards_BT


def _whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x − mean) / std over the masked tokens of the whole step; 0 off the mask."""
    values = x_BT[mask_BT]
    return torch.where(mask_BT, (x_BT - values.mean()) / (values.std() + eps), 0.0)
