"""A rollout engine that computes nothing, for measuring the controller's dispatch at many workers.

It imports neither torch nor vLLM, so a simulated rollout worker is a bare Ray worker process (about 90 MB): on one
machine, far more of them fit than real engines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlft.rollout.config import RolloutConfig, SamplingConfig
from rlft.data.samples import Completion


class SimulatedEngine:
    """An engine that computes nothing: each call sleeps ``simulated_seconds_per_token`` for every response token
    it returns and every response is ``max_new_tokens`` copies of the eos token. With it, a step's generate phase
    takes a known time per worker, so what a run measures beyond that is the controller's dispatch and transfers.
    Weights are taken (fetched and read through) like a real engine's, then dropped."""

    def __init__(self, model_path: str, cfg: RolloutConfig):
        config = json.loads((Path(model_path) / "config.json").read_text())
        eos = config.get("eos_token_id")
        self.token_id = (eos[0] if isinstance(eos, list) else eos) or 0
        self.seconds_per_token = cfg.simulated_seconds_per_token

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        sampling: SamplingConfig,
        num_samples_per_prompt: int,
        seeds: list[int],
    ) -> list[list[Completion]]:
        length = sampling.max_new_tokens
        time.sleep(self.seconds_per_token * length * num_samples_per_prompt * len(prompt_token_ids))
        return [
            [Completion([self.token_id] * length, [0.0] * length, "", "length") for _ in range(num_samples_per_prompt)]
            for _ in prompt_token_ids
        ]

    weights_cross_processes = False

    def update_weights(self, buckets: list) -> None:
        for bucket in buckets:
            for _ in bucket.named_tensors():
                pass

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return [[0.0] * (len(seq) - 1) for seq in sequences]
