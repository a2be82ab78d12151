"""Online (iterative) DPO: the policy's own samples, ranked by graders, become the preference pairs.

```
prompts ──► rollout workers: rl.num_samples_per_prompt samples each ──► grader pool: a reward per sample
   ──► per prompt, best vs worst sample = one pair (a prompt whose samples all score the same is dropped, counted)
   ──► reference server: log-probabilities of the pairs ──► learner update with DPOLoss
   ──► weight sync learner ──► rollout workers;  every dpo.ref_update_every_n_steps: policy ──► reference
```

Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792; Xiong et al. 2024,
"Iterative Preference Learning from Human Feedback", arXiv:2312.11456. The learner step always holds
``rl.num_prompts_per_step`` pairs: the places of dropped prompts are filled with weight-0 copies, so the loss is
the mean over the real pairs.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from rlft.config import Config
from rlft.controller.common import RunResult
from rlft.controller.dpo import Pairs, loss_of, pair_batch, rows_config
from rlft.controller.rl_steps import end_rl_step, start_rl_job
from rlft.controller.run import Run
from rlft.controller.step_metrics import rollout_metrics, sync_metrics
from rlft.data.tokenize import TokenizedExample
from rlft.names import Phase
from rlft.rollout import Sample
from rlft.timing import PhaseTimer


def best_and_worst(samples: list[Sample], rewards_PG: torch.Tensor) -> tuple[Pairs, int]:
    """One pair per prompt whose samples' rewards differ: (highest, lowest), first of equals; and the number of
    prompts dropped as ties."""
    chosen, rejected = [], []
    num_samples = rewards_PG.shape[1]
    for p, rewards_G in enumerate(rewards_PG):
        best, worst = int(rewards_G.argmax()), int(rewards_G.argmin())
        if rewards_G[best] == rewards_G[worst]:
            continue
        for index, out in ((best, chosen), (worst, rejected)):
            s = samples[p * num_samples + index]
            weights = [0.0] * len(s.prompt_token_ids) + [1.0] * len(s.response_token_ids)
            out.append(TokenizedExample(s.prompt_token_ids + s.response_token_ids, weights))
    return Pairs(chosen, rejected, source="rollouts"), rewards_PG.shape[0] - len(chosen)


def online_dpo(cfg: Config) -> RunResult:
    d = cfg.dpo
    num_pairs = cfg.rl.num_prompts_per_step
    with Run(rows_config(cfg)) as run:
        # The learner's loss has no KL term here; the reference server scores the pairs.
        job = start_rl_job(run, with_reference=True)
        pad_id = job.tokenizer.pad_token_id
        loss = loss_of(cfg)
        for step in run.steps():
            with run.recover_learners():  # a dead learner: all ranks restarted, steps since the checkpoint redone
                timer = PhaseTimer()
                step_start = time.perf_counter()
                indices = run.sampler.next_batch()
                samples, graded, staleness = job.rollouts.take(step, indices, timer)
                rewards_PG = torch.tensor(graded.rewards, dtype=torch.float32).view(len(indices), -1)

                with timer.phase(Phase.PAIRS):
                    pairs, num_ties = best_and_worst(samples, rewards_PG)
                update: dict[str, float] = {}
                if len(pairs):
                    with timer.phase(Phase.REFERENCE):
                        # Fill the step with weight-0 copies of the first pair; the real pairs share the weight.
                        order = list(range(len(pairs))) + [0] * (num_pairs - len(pairs))
                        batch = pair_batch(pairs, order, pad_id, None, num_weighted=len(pairs))
                        batch = dataclasses.replace(batch, ref_logprobs_BT=job.reference.keep_logprobs(batch))
                    with timer.phase(Phase.UPDATE):
                        m = job.learners.train_step(batch, loss).metrics
                    update = {f"train/{k}": m[k] for k in ("loss", "accuracy", "margin", "chosen_logps",
                                                            "rejected_logps", "grad_norm", "lr")}
                    update.update({"train/batch_tokens": m["num_tokens"], "train/update_tokens": m["num_tokens"]})
                with timer.phase(Phase.SYNC):
                    sync = job.rollouts.publish(step)
                    if d.ref_update_every_n_steps and step % d.ref_update_every_n_steps == 0:
                        job.reference.sync_from(job.learners, step)

                end_rl_step(
                    job,
                    step,
                    {
                        **rollout_metrics(samples, job.prompts, rewards_PG.flatten(), step),
                        "pairs/num": len(pairs),
                        "pairs/ties_dropped": num_ties,
                        **update,
                        **graded.metrics(),
                        **sync_metrics(sync),
                        **staleness,
                        **timer.metrics(),
                        "time/step_seconds": time.perf_counter() - step_start,
                    },
                )
        return run.finish()
