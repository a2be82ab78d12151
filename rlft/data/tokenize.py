"""Examples to token ids with per-token loss weights: chat templates, loss only on the assistant's tokens.

Convention: ``loss_weights[t]`` is the weight of the loss on *predicting token t*, so it lines up with
``input_ids[t]``; the logits that predict token t sit at position t - 1, and the learner shifts::

    loss = sum_t loss_weights[t] * -log p(input_ids[t] | input_ids[:t])      for t >= 1

Nothing predicts the first token of a sequence, so its weight is always 0 (which also keeps a packed row from
training one example's last logits on the next example's first token).

Which tokens are the assistant's comes from the chat template's ``{% generation %}`` blocks (transformers'
``return_assistant_tokens_mask``): the content and the end-of-turn token, not the role header and not what the
template writes between turns. Templates without those blocks fall back to rendering the conversation turn by turn
(see ``_weights_by_incremental_rendering``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rlft.data.formats import ChatExample, DataError, PromptCompletionExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# transformers' own generic fast tokenizer (one class under both names). A model directory that names it is loaded
# through it directly: AutoTokenizer would resolve the same class, but importing AutoTokenizer imports transformers'
# model registry with it (torch._dynamo, the tensor-parallel code), over 2 s of a driver's start on 2 cores.
_GENERIC_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of the model at ``path`` (a directory or a hub id), as ``AutoTokenizer.from_pretrained``
    loads it."""
    try:
        tokenizer_class = json.loads((Path(path) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        tokenizer_class = None  # a hub id, or no config to read: AutoTokenizer decides
    if tokenizer_class in _GENERIC_TOKENIZER_CLASSES:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class ChatTemplateError(ValueError):
    """The chat template renders a conversation in a way that the loss mask cannot follow."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    loss_weights: list[float]  # weight of the loss on predicting input_ids[t]; see the module docstring
    truncated: bool = False  # the rendered example was longer than max_seq_len and lost its tail

    @property
    def position_ids(self) -> list[int]:
        return list(range(len(self.input_ids)))


def tokenize_chat(
    messages: list[dict],
    turn_weights: list[float],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    tools: list[dict] | None = None,
) -> TokenizedExample:
    """Render ``messages`` with the tokenizer's chat template; the tokens of assistant message i get
    ``turn_weights[i]`` (one weight per message, 0 for non-assistant roles), every other token weight 0.

    The head is kept when the rendering is longer than ``max_seq_len`` tokens.
    """
    if len(turn_weights) != len(messages):
        raise ValueError(f"{len(turn_weights)} turn weights for {len(messages)} messages")
    weighted = _weights_from_generation_tags(messages, turn_weights, tokenizer, tools)
    if weighted is None:
        weighted = _weights_by_incremental_rendering(messages, turn_weights, tokenizer, tools)
    input_ids, loss_weights = weighted
    return _tokenized_example(input_ids, loss_weights, max_seq_len)


def tokenize_prompt_completion(
    prompt: str | list[dict],
    completion: str | list[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
) -> TokenizedExample:
    """Raw text: ``tokenizer(prompt)`` (with the tokenizer's own special tokens, e.g. BOS), then the completion's
    tokens and the eos token, which carry the loss. Message lists go through the chat template instead."""
    if isinstance(prompt, list):
        turn_weights = [0.0] * len(prompt) + [1.0] * len(completion)
        return tokenize_chat(prompt + completion, turn_weights, tokenizer, max_seq_len)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end a completion with")
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    loss_weights = [0.0] * len(prompt_ids) + [1.0] * len(completion_ids)
    return _tokenized_example(prompt_ids + completion_ids, loss_weights, max_seq_len)


def tokenize_prompt(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None = None
) -> list[int]:
    """The prompt for generation: the rendered messages followed by the assistant header."""
    return _render_ids(tokenizer, messages, tools, add_generation_prompt=True)


def tokenize_sft_examples(
    examples: list[ChatExample | PromptCompletionExample],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    on_long_row: Literal["truncate", "drop"] = "truncate",
) -> tuple[list[TokenizedExample], int, int]:
    """Tokenize SFT examples; return ``(tokenized, num_dropped, num_truncated)``.

    Examples longer than ``max_seq_len`` are truncated (head kept) or, with ``on_long_row="drop"``, dropped.
    An example with no loss weight left after truncation is dropped too. A template that the loss mask cannot
    follow raises ``DataError`` naming the example's ``file:line``.
    """
    if on_long_row not in ("truncate", "drop"):
        raise ValueError(f"on_long_row must be 'truncate' or 'drop', got {on_long_row!r}")
    kept, num_dropped, num_truncated = [], 0, 0
    for example in examples:
        tokenized = _tokenize_sft_example(example, tokenizer, max_seq_len)
        if (tokenized.truncated and on_long_row == "drop") or not any(tokenized.loss_weights):
            num_dropped += 1
            continue
        num_truncated += tokenized.truncated
        kept.append(tokenized)
    return kept, num_dropped, num_truncated


def _tokenize_sft_example(
    example: ChatExample | PromptCompletionExample, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> TokenizedExample:
    try:
        if isinstance(example, ChatExample):
            return tokenize_chat(example.messages, example.turn_weights, tokenizer, max_seq_len, example.tools)
        return tokenize_prompt_completion(example.prompt, example.completion, tokenizer, max_seq_len)
    except ChatTemplateError as exc:
        field = "messages" if isinstance(example, ChatExample) else "completion"
        raise DataError(example.where, field, str(exc)) from exc


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    tools: list[dict] | None,
    add_generation_prompt: bool = False,
    return_assistant_tokens_mask: bool = False,
) -> dict:
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=return_assistant_tokens_mask,
    )


def _render_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool
) -> list[int]:
    return list(_render(tokenizer, messages, tools, add_generation_prompt)["input_ids"])


def _weights_from_generation_tags(
    messages: list[dict], turn_weights: list[float], tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None
) -> tuple[list[int], list[float]] | None:
    """Token ids and loss weights from the template's ``{% generation %}`` blocks; ``None`` when the template has
    none (or the tokenizer cannot map characters to tokens), so the caller falls back.

    Each contiguous run of 1s in transformers' assistant mask is one assistant message, in order.
    """
    if not tokenizer.is_fast or not GENERATION_TAG.search(tokenizer.get_chat_template(None, tools)):
        return None
    rendered = _render(tokenizer, messages, tools, return_assistant_tokens_mask=True)
    input_ids, assistant_mask = list(rendered["input_ids"]), rendered["assistant_masks"]
    if not any(assistant_mask):
        return None
    spans = _runs_of_ones(assistant_mask)
    assistant_weights = [w for m, w in zip(messages, turn_weights) if m["role"] == "assistant"]
    if len(spans) != len(assistant_weights):
        raise ChatTemplateError(
            f"the chat template marks {len(spans)} generation spans for {len(assistant_weights)} assistant "
            "messages; it must wrap each assistant message, and only those, in {% generation %}"
        )
    loss_weights = [0.0] * len(input_ids)
    for (start, stop), weight in zip(spans, assistant_weights):
        loss_weights[start:stop] = [weight] * (stop - start)
    return input_ids, loss_weights


def _weights_by_incremental_rendering(
    messages: list[dict], turn_weights: list[float], tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None
) -> tuple[list[int], list[float]]:
    """Loss weights for a template without ``{% generation %}`` blocks.

    Assistant message i's tokens are those that ``messages[:i + 1]`` adds to ``messages[:i]`` rendered with the
    generation prompt, up to and including the last eos token in them: the end-of-turn token is learned, what the
    template writes after it (a newline between turns) is not, as with generation tags. Each shorter rendering must
    be a token prefix of the longer one; templates that rewrite earlier turns raise ``ChatTemplateError``.
    """
    input_ids = _render_ids(tokenizer, messages, tools, add_generation_prompt=False)
    loss_weights = [0.0] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ChatTemplateError(
                "messages[0] is an assistant message; a conversation that opens with the assistant needs a chat "
                "template with {% generation %} blocks"
            )
        prompt_ids = _render_ids(tokenizer, messages[:i], tools, add_generation_prompt=True)
        turn_ids = _render_ids(tokenizer, messages[: i + 1], tools, add_generation_prompt=False)
        if turn_ids[: len(prompt_ids)] != prompt_ids or input_ids[: len(turn_ids)] != turn_ids:
            raise ChatTemplateError(
                f"messages[{i}]: rendering the conversation turn by turn does not give token prefixes of the whole "
                "(the template changes earlier turns or the tokenizer merges across turns); use a chat template "
                "with {% generation %} blocks"
            )
        stop = _end_of_turn(turn_ids, len(prompt_ids), tokenizer.eos_token_id)
        loss_weights[len(prompt_ids) : stop] = [turn_weights[i]] * (stop - len(prompt_ids))
    return input_ids, loss_weights


def _end_of_turn(turn_ids: list[int], start: int, eos_token_id: int | None) -> int:
    """One past the last eos token in ``turn_ids[start:]``, or its end when there is none."""
    for t in range(len(turn_ids) - 1, start - 1, -1):
        if turn_ids[t] == eos_token_id:
            return t + 1
    return len(turn_ids)


def _runs_of_ones(mask: list[int]) -> list[tuple[int, int]]:
    """``[0, 1, 1, 0, 1]`` -> ``[(1, 3), (4, 5)]``: the (start, stop) of each run of 1s."""
    runs = []
    for t, bit in enumerate(mask):
        if bit and (t == 0 or not mask[t - 1]):
            runs.append((t, t + 1))
        elif bit:
            runs[-1] = (runs[-1][0], t + 1)
    return runs


def _tokenized_example(input_ids: list[int], loss_weights: list[float], max_seq_len: int) -> TokenizedExample:
    """Keep the head of at most ``max_seq_len`` tokens; the first token gets weight 0 (nothing predicts it)."""
    loss_weights = [0.0, *loss_weights[1:max_seq_len]] if loss_weights else []
    return TokenizedExample(input_ids[:max_seq_len], loss_weights, truncated=len(input_ids) > max_seq_len)
