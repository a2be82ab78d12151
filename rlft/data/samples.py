"""What rollout engines and workers return, one response per object, typed: the samples every later stage reads
(graders, environments, the controller, the batch builders in ``rlft.data.batch``). No torch, so the config and
the rollout package's face can import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# ``stop``: the response ended with the eos token or a stop string; ``length``: it ran into ``max_new_tokens``.
FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    """One response of an engine to one prompt."""

    token_ids: list[int]
    # Sampler logprob of each token in ``token_ids``: log p(token | prefix) under the model's own distribution
    # (raw logits: no temperature, top-k or top-p applied), the quantity a learner recomputes.
    logprobs: list[float]
    # Decoded without special tokens; ends before a stop string.
    text: str
    finish_reason: FinishReason


@dataclass
class Sample:
    """One response with where it came from: the prompt and the policy version that generated it."""

    # The caller's index of the prompt (for example its position in the step's batch or in the dataset).
    prompt_index: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    # Aligned with ``response_token_ids``; see ``Completion.logprobs``.
    response_logprobs: list[float]
    response_text: str
    finish_reason: FinishReason
    policy_version: int
    # Multi-turn (``envs.name``): ``response_token_ids`` holds every turn and every observation, token-in/token-out;
    # the mask is 1 on the policy's tokens (``response_logprobs`` is 0 elsewhere) and ``response_text`` is the
    # policy's last turn. None: single-turn, every response token is the policy's.
    response_mask: list[int] | None = None
    num_turns: int = 1
    num_tool_calls: int = 0
    env_reward: float = 0.0
    # DAPO's overlong penalty (≤ 0, ``rl.overlong_buffer``), set by the controller when it shapes the rewards.
    overlong_penalty: float = 0.0
    # "", or why the environment gave up on this trajectory: "error", "timeout", "invalid" (rlft/envs/runner.py).
    env_failure: str = ""
    messages: list[dict] | None = None  # the transcript, multi-turn only

    @property
    def num_policy_tokens(self) -> int:
        """The tokens the policy generated: a multi-turn sample's observations are not counted."""
        mask = self.response_mask
        return len(self.response_token_ids) if mask is None else sum(mask)
