"""RFT prompts: rows read, validated and tokenized with the chat template before any actor starts."""

from __future__ import annotations

from dataclasses import dataclass

from rlft.data import formats
from rlft.data.formats import RFTPrompt
from rlft.data.sources import DataError
from rlft.data.tokenize import tokenize_prompt


@dataclass
class PromptSet:
    items: list[RFTPrompt]
    token_ids: list[list[int]]

    def answer(self, index: int) -> str | None:
        """Prompt ``index``'s reference answer (its row's ``answer`` field), None if it has none."""
        answer = self.items[index].extra.get("answer")
        return answer if isinstance(answer, str) else None


def load_prompts(path: str, tokenizer, *, on_bad_row: str, max_model_len: int, max_new_tokens: int,
                 limit: int | None = None) -> PromptSet:
    """Read RFT prompt rows and tokenize them with the chat template; a prompt too long for the rollout engine's
    ``max_model_len`` (``rollout.max_model_len``) with ``max_new_tokens`` (``rollout.sampling.max_new_tokens``)
    of room is an error naming its row, before any actor starts. ``on_bad_row``: ``data.on_bad_row``."""
    loaded = formats.load_examples(path, formats.parse_rft, on_bad_row=on_bad_row, limit=limit)
    room = max_model_len - max_new_tokens
    token_ids = []
    for item in loaded.examples:
        ids = tokenize_prompt(item.messages, tokenizer)
        if len(ids) > room:
            raise DataError(
                item.where,
                "messages",
                f"prompt of {len(ids)} tokens leaves no room for rollout.sampling.max_new_tokens = "
                f"{max_new_tokens} within rollout.max_model_len = {max_model_len}",
            )
        token_ids.append(ids)
    return PromptSet(loaded.examples, token_ids)
