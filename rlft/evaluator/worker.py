"""The evaluation worker of SFT and DPO runs, which have no rollout workers: a role actor holding a Hugging Face
copy of the policy (``EvaluationWorker``) and its facade (``HeldOutEvaluation``). The learners publish their weights
to it through the object store, never through the driver, and it generates greedy answers for the held-out
prompts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from rlft import startup
from rlft.data.formats import RFTPrompt
from rlft.data.tokenize import load_tokenizer, tokenize_prompt
from rlft.distributed.actors import Resources, kill, spawn, wait
from rlft.distributed.weight_sync import WeightSource, iter_bucket_weights, receive_buckets
from rlft.evaluator.results import EvalResult, check_eval_items, eval_items, extracted_accuracy, result_metrics, write_samples
from rlft.graders.exact import exact_match


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
        # The model class loads here, in the evaluator's process: the drivers that import this module build none.
        from transformers import AutoModelForCausalLM

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
        self.evaluator.load_weights(dict(iter_bucket_weights(receive_buckets(handle))))
        return self.evaluator.run()


class HeldOutEvaluation:
    """The facade over the evaluation worker of an SFT or DPO run. It needs no CPU of its own: it works only while
    the learners wait for it."""

    def __init__(self, cfg, items: list[RFTPrompt]):
        self.cfg = cfg
        self.worker = spawn(EvaluationWorker, cfg, items, resources=Resources(num_cpus=0),
                            local=cfg.ray.local_mode)

    def evaluate(self, learners: WeightSource, version: int, samples_path: Path) -> dict[str, float]:
        """Publish the learners' current weights to the worker, evaluate, save the completions; the metrics."""
        rollout = self.cfg.rollout
        handle = learners.publish_weights(version, "object_store", int(rollout.weight_sync_bucket_mib * 2**20))
        result = wait(self.worker.evaluate.remote(handle), rollout.weight_sync_timeout_s + 3600)
        write_samples(samples_path, result)
        return result_metrics(result)

    def shutdown(self) -> None:
        kill([self.worker])
