"""Held-out exact-match accuracy by greedy generation, for every algorithm.

RL runs generate with their rollout workers (``held_out_accuracy``). SFT and DPO runs, which have none, start one
evaluation worker (``EvaluationWorker``, a Ray actor holding a Hugging Face copy of the policy): the learners publish
their weights to it through the object store, never through the driver, and it generates answers for the held-out
prompts (RFT prompt rows with an ``answer`` field). A completion is correct by ``rlft.graders.exact`` (stripped of
whitespace, it equals the stripped answer). With ``eval.extract_pattern`` a second, lenient figure scores the
answer the pattern finds in the completion (``extracted_accuracy``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from rlft import startup
from rlft.data.formats import RFTPrompt, DataError
from rlft.data.tokenize import load_tokenizer, tokenize_prompt
from rlft.graders.exact import exact_match


@dataclass
class EvalResult:
    accuracy: float
    num_examples: int
    mean_completion_tokens: float
    samples: list[dict]
    # The share of completions whose extracted answer is right (``eval.extract_pattern``); None without a pattern.
    extracted_accuracy: float | None = None


def extracted_answer(completion: str, pattern: str) -> str | None:
    """The answer ``pattern`` finds in ``completion``: its last match, the first group if the pattern has one."""
    matches = list(re.finditer(pattern, completion))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.re.groups else last.group(0)).strip()


def extracted_accuracy(records: list[dict], pattern: str) -> float:
    """The share of ``records`` (``completion`` and ``answer``) whose extracted answer equals the stripped answer."""
    right = [extracted_answer(r["completion"], pattern) == r["answer"].strip() for r in records]
    return sum(right) / max(len(right), 1)


def check_eval_items(items: list[RFTPrompt]) -> None:
    """Every held-out prompt needs a string ``answer``; checked before training starts."""
    for item in items:
        answer = item.extra.get("answer")
        if not isinstance(answer, str):
            raise DataError(item.where, "answer", "held-out prompts need a string 'answer' field")


class Evaluator:
    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        items: list[RFTPrompt],
        max_new_tokens: int,
        batch_size: int,
        extract_pattern: str = "",
    ):
        from transformers import AutoModelForCausalLM  # here: the driver of an RL job never builds a model

        check_eval_items(items)
        self.extract_pattern = extract_pattern
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.tokenizer = tokenizer
        self.items = items
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.prompt_ids = [tokenize_prompt(item.messages, tokenizer) for item in items]

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"exported weights do not fit the model: missing {missing}, unexpected {unexpected}")

    @torch.no_grad()
    def run(self) -> EvalResult:
        pad_id = self.tokenizer.pad_token_id
        eos_id = self.tokenizer.eos_token_id
        samples = []
        for start in range(0, len(self.items), self.batch_size):
            chunk = self.prompt_ids[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            # Left padding, so every prompt ends where generation starts.
            input_ids_BT = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk])
            attention_mask_BT = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk])
            out_BT = self.model.generate(
                input_ids=input_ids_BT,
                attention_mask=attention_mask_BT,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )
            for item, new_ids in zip(self.items[start:], out_BT[:, width:].tolist()):
                if eos_id in new_ids:
                    new_ids = new_ids[: new_ids.index(eos_id)]
                completion = self.tokenizer.decode(new_ids, skip_special_tokens=True)
                answer = item.extra["answer"]
                samples.append(
                    {
                        "prompt": item.messages[-1]["content"],
                        "completion": completion,
                        "answer": answer,
                        "correct": exact_match(completion, answer),
                        "num_tokens": len(new_ids),
                    }
                )
        num = max(len(samples), 1)
        return EvalResult(
            accuracy=sum(s["correct"] for s in samples) / num,
            num_examples=len(samples),
            mean_completion_tokens=sum(s["num_tokens"] for s in samples) / num,
            samples=samples,
            extracted_accuracy=extracted_accuracy(samples, self.extract_pattern) if self.extract_pattern else None,
        )


def write_samples(path: Path, result: EvalResult) -> None:
    with path.open("w") as f:
        for sample in result.samples:
            f.write(json.dumps(sample) + "\n")


def eval_items(cfg) -> list[RFTPrompt] | None:
    """The first ``eval.num_examples`` prompts of ``eval.path``, checked (each needs an ``answer``); None when the
    config asks for no evaluation. Called before any actor starts."""
    from rlft.data import formats

    if not (cfg.eval.path and cfg.eval.num_examples):
        return None
    items = formats.load_examples(cfg.eval.path, formats.parse_rft).examples[: cfg.eval.num_examples]
    check_eval_items(items)
    return items


def task_evaluator(cfg, tokenizer) -> Evaluator | None:
    """The greedy exact-match evaluator of ``eval.path`` (its first ``eval.num_examples`` prompts), or None."""
    items = eval_items(cfg)
    if items is None:
        return None
    return Evaluator(
        cfg.model.path, tokenizer, items, cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.eval.extract_pattern
    )


class EvaluationWorker:
    """An ``Evaluator`` in a role actor of its own: it takes the learners' weights as a ``WeightHandle``."""

    def __init__(self, cfg, items: list[RFTPrompt]):
        startup.mark("evaluator", "actor")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        tokenizer = load_tokenizer(cfg.model.tokenizer_path)
        self.evaluator = Evaluator(cfg.model.path, tokenizer, items, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                   cfg.eval.extract_pattern)
        startup.mark("evaluator", "ready")

    def evaluate(self, handle) -> EvalResult:
        from rlft.distributed.weight_sync import iter_bucket_weights, receive_buckets

        self.evaluator.load_weights(dict(iter_bucket_weights(receive_buckets(handle))))
        return self.evaluator.run()


class HeldOutEvaluation:
    """The facade over the evaluation worker of an SFT or DPO run. It needs no CPU of its own: it works only while
    the learners wait for it."""

    def __init__(self, cfg, items: list[RFTPrompt]):
        from rlft.distributed.actors import Resources, spawn

        self.cfg = cfg
        self.worker = spawn(EvaluationWorker, cfg, items, resources=Resources(num_cpus=0),
                            local=cfg.ray.local_mode)

    def evaluate(self, learners, version: int, samples_path: Path) -> dict[str, float]:
        """Publish the learners' current weights to the worker, evaluate, save the completions; the metrics."""
        from rlft.distributed.actors import wait

        rollout = self.cfg.rollout
        handle = learners.publish_weights(version, "object_store", int(rollout.weight_sync_bucket_mib * 2**20))
        result = wait(self.worker.evaluate.remote(handle), rollout.weight_sync_timeout_s + 3600)
        write_samples(samples_path, result)
        return result_metrics(result)

    def shutdown(self) -> None:
        from rlft.distributed.actors import kill

        kill([self.worker])


def result_metrics(result: EvalResult) -> dict[str, float]:
    metrics = {
        "eval/accuracy": result.accuracy,
        "eval/num_examples": result.num_examples,
        "eval/mean_completion_tokens": result.mean_completion_tokens,
    }
    if result.extracted_accuracy is not None:
        metrics["eval/extracted_accuracy"] = result.extracted_accuracy
    return metrics


def held_out_accuracy(
    rollout, prompts, sampling, num_samples: int = 1, multi_turn: bool = False
) -> tuple[float, float, float, list[dict]]:
    """Exact match of ``num_samples`` completions per prompt (a ``PromptSet``) generated by the rollout workers:
    (mean accuracy over all completions, pass@k (share of prompts with a correct one), mean completion tokens, one
    record per completion). ``multi_turn``: each is a trajectory with the configured environment, its last turn
    the answer scored, and its record holds the transcript, turns and tool calls."""
    if multi_turn:
        samples = rollout.generate([{"messages": it.messages, **it.extra} for it in prompts.items], sampling,
                                   num_samples)
    else:
        samples = rollout.generate(prompts.token_ids, sampling, num_samples)
    records = []
    for s in samples:
        answer = prompts.answer(s.prompt_index)
        record = {
            "prompt": prompts.items[s.prompt_index].messages[-1]["content"],
            "completion": s.response_text,
            "answer": answer,
            "correct": answer is not None and exact_match(s.response_text, answer),
        }
        if multi_turn:
            record.update(num_turns=s.num_turns, num_tool_calls=s.num_tool_calls, env_failure=s.env_failure,
                          messages=s.messages)
        records.append(record)
    num = max(len(samples), 1)
    solved = {s.prompt_index for s, r in zip(samples, records) if r["correct"]}
    # Policy tokens only: a trajectory's observations are not the model's.
    mean_tokens = sum(sum(s.response_mask) if s.response_mask else len(s.response_token_ids) for s in samples) / num
    pass_at_k = len(solved) / max(len(prompts.items), 1)
    return sum(r["correct"] for r in records) / num, pass_at_k, mean_tokens, records


def trajectory_metrics(records: list[dict], prefix: str) -> dict[str, float]:
    """The mean turns and tool calls of multi-turn evaluation records, and how many of them an environment failed."""
    num = max(len(records), 1)
    return {
        f"{prefix}turns_mean": sum(r["num_turns"] for r in records) / num,
        f"{prefix}tool_calls_mean": sum(r["num_tool_calls"] for r in records) / num,
        f"{prefix}env_failures": sum(bool(r["env_failure"]) for r in records),
    }
