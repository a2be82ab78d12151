"""Reward-model graders (RLHF): a Hugging Face sequence-classification model scores prompt + completion.

``RewardModelGroup`` is a typed facade over ``num_replicas`` actors of its own (``RewardModelWorker``), started by
the grader pool and handed to its grader workers, so one copy of the model serves every grader worker:

    group = RewardModelGroup(item, local=False)
    group.score([messages + [{"role": "assistant", "content": completion}], ...])  # one float per conversation

Each conversation is rendered with the reward model's chat template (or, without one, as ``role: content`` lines),
scored in batches of ``batch_size``, and the score is the model's first output logit at the last real token.
"""

from __future__ import annotations

import torch

from rlft.distributed.actors import Resources, balanced_chunks, kill, spawn, wait


class RewardModelWorker:
    def __init__(self, model_path: str, batch_size: int, max_length: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype="float32").eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length

    def ready(self) -> bool:
        return True

    def render(self, conversation: list[dict]) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in conversation)

    @torch.no_grad()
    def score(self, conversations: list[list[dict]]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(conversations), self.batch_size):
            texts = [self.render(c) for c in conversations[start : start + self.batch_size]]
            batch = self.tokenizer(
                texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                add_special_tokens=False,
            )
            logits = self.model(**batch).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores


class RewardModelGroup:
    """``num_replicas`` reward-model actors (one in-process worker when ``local``); batches are split evenly."""

    def __init__(self, model_path: str, num_replicas: int, batch_size: int, max_length: int,
                 resources: Resources, local: bool = False):
        self.workers = [
            spawn(RewardModelWorker, model_path, batch_size, max_length, resources=resources, local=local)
            for _ in range(1 if local else num_replicas)
        ]
        wait([w.ready.remote() for w in self.workers])

    def score(self, conversations: list[list[dict]]) -> list[float]:
        calls = [
            worker.score.remote(conversations[start:stop])
            for worker, (start, stop) in zip(self.workers, balanced_chunks(len(conversations), len(self.workers)))
            if stop > start
        ]
        return [s for part in wait(calls) for s in part]

    def shutdown(self) -> None:
        kill(self.workers)
        self.workers = []
