"""The OpenAI fine-tuning formats: rows parsed and validated into typed examples.

Every check names the row (``file:line``) and the field (``messages[2].role``), so a bad file stops a run before
training starts with ``train.jsonl:12: messages[2].role: must be one of ...``. The formats:

- SFT chat (OpenAI): ``{"messages": [{"role", "content", "weight": 0|1 on assistant turns}], "tools": [...]}``.
- SFT prompt/completion: legacy ``{"prompt": str, "completion": str}`` (raw text, no chat template), or TRL's
  conversational form where both are message lists (rendered with the chat template).
- Preference (OpenAI): ``{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}``,
  or ``{"prompt", "chosen", "rejected"}`` with strings or message lists.
- RFT prompts: ``{"messages": [... ending without an assistant turn], **fields the graders read}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from rlft.data.sources import DataError, Row, json_type_name, read_rows

__all__ = [
    "ChatExample",
    "DataError",
    "LoadedData",
    "PreferenceExample",
    "PromptCompletionExample",
    "RFTPrompt",
    "load_examples",
    "parse_preference",
    "parse_rft",
    "parse_sft",
]

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")
SFT_CHAT_KEYS = ("messages", "tools", "parallel_tool_calls", "metadata")
SFT_PROMPT_COMPLETION_KEYS = ("prompt", "completion", "metadata")
OPENAI_PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output", "metadata")
OPENAI_PREFERENCE_INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")
PLAIN_PREFERENCE_KEYS = ("prompt", "chosen", "rejected", "metadata")
# How many error messages ``load_examples`` keeps for the log when it skips bad rows.
NUM_ERRORS_KEPT = 5


@dataclass
class ChatExample:
    messages: list[dict]  # role/content messages, without their "weight" keys
    # One weight per message: 0 or 1 on assistant messages (default 1), 0 on every other role.
    turn_weights: list[float]
    where: str
    tools: list[dict] | None = None


@dataclass
class PromptCompletionExample:
    # Both strings (raw text, no chat template) or both message lists (rendered with the chat template).
    prompt: str | list[dict]
    completion: str | list[dict]
    where: str


@dataclass
class PreferenceExample:
    prompt_messages: list[dict]
    chosen_messages: list[dict]  # assistant messages
    rejected_messages: list[dict]  # assistant messages
    where: str
    tools: list[dict] | None = None


@dataclass
class RFTPrompt:
    messages: list[dict]  # ends without an assistant turn; the policy writes the next one
    extra: dict  # every other field of the row (e.g. ``answer``), for the graders
    where: str


@dataclass
class LoadedData:
    examples: list
    num_rows: int  # rows read, bad ones included
    num_skipped: int
    errors: list[str] = field(default_factory=list)  # the first few problems, for the log


Example = TypeVar("Example")


def load_examples(
    path: str,
    parse: Callable[[Row], Example],
    on_bad_row: Literal["error", "skip"] = "error",
    limit: int | None = None,
) -> LoadedData:
    """Read and parse every row of ``path`` (JSONL, Parquet or a ``datasets`` directory) before training starts.

    ``on_bad_row="error"`` raises the first ``DataError``; ``"skip"`` drops bad rows, counts them and keeps the first
    few messages. Reading stops after ``limit`` good examples. A file that yields no good example is an error.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for every row), got {limit}")
    loaded = LoadedData(examples=[], num_rows=0, num_skipped=0)

    def bad_row(error: DataError) -> None:
        if on_bad_row == "error":
            raise error
        loaded.num_rows += 1
        loaded.num_skipped += 1
        if len(loaded.errors) < NUM_ERRORS_KEPT:
            loaded.errors.append(str(error))

    for row in read_rows(path, on_bad_line=bad_row):
        try:
            example = parse(row)
        except DataError as error:
            bad_row(error)
            continue
        loaded.num_rows += 1
        loaded.examples.append(example)
        if len(loaded.examples) == limit:
            break
    if not loaded.examples:
        first = f"; first problem: {loaded.errors[0]}" if loaded.errors else ""
        raise DataError(path, "", f"no valid rows ({loaded.num_rows} read, {loaded.num_skipped} skipped){first}")
    return loaded


# --------------------------------------------------------------------------------------------------------------
# SFT


def parse_sft(
    row: Row, format: Literal["auto", "chat", "prompt_completion"] = "auto"
) -> ChatExample | PromptCompletionExample:
    """An SFT row as a typed example; ``auto`` picks chat for ``messages``, prompt/completion for ``prompt``."""
    if format == "auto":
        format = _sft_format_of(row)
    if format == "chat":
        return _parse_chat(row)
    if format == "prompt_completion":
        return _parse_prompt_completion(row)
    raise ValueError(f"unknown SFT format {format!r}; expected 'auto', 'chat' or 'prompt_completion'")


def _sft_format_of(row: Row) -> str:
    if "messages" in row.data:
        return "chat"
    if "prompt" in row.data or "completion" in row.data:
        return "prompt_completion"
    raise DataError(row.where, "messages", "missing; an SFT row has 'messages' or 'prompt' and 'completion'")


def _parse_chat(row: Row) -> ChatExample:
    _check_keys(row, SFT_CHAT_KEYS)
    messages, weights = _messages(row.data, "messages", row.where, weighted=True)
    if "assistant" not in (m["role"] for m in messages):
        raise DataError(row.where, "messages", "no assistant message; SFT learns from assistant turns")
    if not any(weights):
        raise DataError(row.where, "messages", "every assistant message has weight 0; nothing to learn from")
    return ChatExample(messages, weights, row.where, _tools(row.data, "tools", row.where))


def _parse_prompt_completion(row: Row) -> PromptCompletionExample:
    _check_keys(row, SFT_PROMPT_COMPLETION_KEYS)
    prompt = _required(row.data, "prompt", row.where)
    completion = _required(row.data, "completion", row.where)
    if isinstance(prompt, str) and isinstance(completion, str):
        return PromptCompletionExample(prompt, completion, row.where)
    if isinstance(prompt, str):
        raise DataError(row.where, "completion", f"expected a string like 'prompt', got {json_type_name(completion)}")
    if not isinstance(prompt, list):
        raise DataError(row.where, "prompt", f"expected a string or a list of messages, got {json_type_name(prompt)}")
    if not isinstance(completion, list):
        got = json_type_name(completion)
        raise DataError(row.where, "completion", f"expected a list of messages like 'prompt', got {got}")
    prompt_messages = _prompt_messages(row.data, "prompt", row.where)
    return PromptCompletionExample(prompt_messages, _assistant_messages(row.data, "completion", row.where), row.where)


# --------------------------------------------------------------------------------------------------------------
# Preference pairs


def parse_preference(row: Row) -> PreferenceExample:
    """A preference row (OpenAI ``input``/``preferred_output``/``non_preferred_output`` or ``prompt``/``chosen``/
    ``rejected``) as a typed example; plain strings become a user prompt and assistant responses."""
    if "input" in row.data:
        return _parse_openai_preference(row)
    return _parse_plain_preference(row)


def _parse_openai_preference(row: Row) -> PreferenceExample:
    _check_keys(row, OPENAI_PREFERENCE_KEYS)
    model_input = row.data["input"]
    if not isinstance(model_input, dict):
        raise DataError(row.where, "input", f"expected an object with 'messages', got {json_type_name(model_input)}")
    for key in model_input:
        if key not in OPENAI_PREFERENCE_INPUT_KEYS:
            expected = _listed(OPENAI_PREFERENCE_INPUT_KEYS)
            raise DataError(row.where, f"input.{key}", f"unknown key (expected {expected})")
    return PreferenceExample(
        prompt_messages=_prompt_messages(model_input, "messages", row.where, prefix="input."),
        chosen_messages=_assistant_messages(row.data, "preferred_output", row.where),
        rejected_messages=_assistant_messages(row.data, "non_preferred_output", row.where),
        where=row.where,
        tools=_tools(model_input, "tools", row.where, prefix="input."),
    )


def _parse_plain_preference(row: Row) -> PreferenceExample:
    _check_keys(row, PLAIN_PREFERENCE_KEYS)
    if isinstance(_required(row.data, "prompt", row.where), str):
        prompt_messages = [{"role": "user", "content": row.data["prompt"]}]
    else:
        prompt_messages = _prompt_messages(row.data, "prompt", row.where)
    return PreferenceExample(
        prompt_messages=prompt_messages,
        chosen_messages=_response(row.data, "chosen", row.where),
        rejected_messages=_response(row.data, "rejected", row.where),
        where=row.where,
    )


def _response(data: dict, key: str, where: str) -> list[dict]:
    if isinstance(_required(data, key, where), str):
        return [{"role": "assistant", "content": data[key]}]
    return _assistant_messages(data, key, where)


# --------------------------------------------------------------------------------------------------------------
# RFT prompts


def parse_rft(row: Row) -> RFTPrompt:
    """An RFT prompt: ``messages`` ending without an assistant turn; every other field goes to ``extra``."""
    messages = _prompt_messages(row.data, "messages", row.where)
    extra = {k: v for k, v in row.data.items() if k != "messages"}
    return RFTPrompt(messages, extra, row.where)


# --------------------------------------------------------------------------------------------------------------
# Checks shared by the formats. ``prefix`` is the dotted path of the object holding ``key`` (``"input."``).


def _check_keys(row: Row, allowed: tuple[str, ...]) -> None:
    for key in row.data:
        if key not in allowed:
            raise DataError(row.where, key, f"unknown key (expected {_listed(allowed)})")


def _required(data: dict, key: str, where: str, prefix: str = "") -> Any:
    if key not in data:
        raise DataError(where, prefix + key, "missing")
    return data[key]


def _prompt_messages(data: dict, key: str, where: str, prefix: str = "") -> list[dict]:
    """Messages that a model answers: no weights, and the last one is not the assistant's."""
    messages, _ = _messages(data, key, where, prefix=prefix)
    if messages[-1]["role"] == "assistant":
        path = f"{prefix}{key}[{len(messages) - 1}].role"
        raise DataError(where, path, "a prompt must not end with an assistant message")
    return messages


def _assistant_messages(data: dict, key: str, where: str) -> list[dict]:
    """A response: a non-empty list of assistant messages."""
    messages, _ = _messages(data, key, where)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise DataError(where, f"{key}[{i}].role", f"must be 'assistant' in a response, got {message['role']!r}")
    return messages


def _messages(
    data: dict, key: str, where: str, prefix: str = "", weighted: bool = False
) -> tuple[list[dict], list[float]]:
    """Validate ``data[key]`` as a non-empty message list; return the messages without weights, and the weights.

    ``weighted`` allows a ``weight`` of 0 or 1 on assistant messages (the SFT chat format); an assistant message
    without one has weight 1, every other message weight 0.
    """
    path = prefix + key
    messages = _required(data, key, where, prefix)
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else json_type_name(messages)
        raise DataError(where, path, f"expected a non-empty list of messages, got {got}")
    clean, weights = [], []
    for i, message in enumerate(messages):
        clean.append(_message(message, f"{path}[{i}]", where, weighted))
        weights.append(float(message.get("weight", 1)) if message["role"] == "assistant" else 0.0)
    return clean, weights


def _message(message: Any, path: str, where: str, weighted: bool) -> dict:
    if not isinstance(message, dict):
        raise DataError(where, path, f"expected a message object, got {json_type_name(message)}")
    for key in message:
        if key not in MESSAGE_KEYS:
            raise DataError(where, f"{path}.{key}", f"unknown key (expected {_listed(MESSAGE_KEYS)})")
    role = _required(message, "role", where, f"{path}.")
    if role not in ROLES:
        raise DataError(where, f"{path}.role", f"must be one of {_listed(ROLES)}, got {role!r}")
    calls_tools = role == "assistant" and "tool_calls" in message
    if "tool_calls" in message and not (calls_tools and isinstance(message["tool_calls"], list)):
        raise DataError(where, f"{path}.tool_calls", "only an assistant message has tool_calls, as a list")
    if "content" in message or not calls_tools:
        content = _required(message, "content", where, f"{path}.")
        if not isinstance(content, str):
            raise DataError(where, f"{path}.content", f"expected a string, got {json_type_name(content)}")
    if "weight" in message:
        _check_weight(message["weight"], f"{path}.weight", where, weighted and role == "assistant")
    return {k: v for k, v in message.items() if k != "weight"}


def _check_weight(weight: Any, path: str, where: str, allowed: bool) -> None:
    if not allowed:
        raise DataError(where, path, "only assistant messages of SFT chat rows carry a weight")
    if isinstance(weight, bool) or weight not in (0, 1):
        raise DataError(where, path, f"must be 0 or 1, got {weight!r}")


def _tools(data: dict, key: str, where: str, prefix: str = "") -> list[dict] | None:
    tools = data.get(key)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(where, prefix + key, "expected a list of tool definitions (objects)")
    return tools


def _listed(names: tuple[str, ...]) -> str:
    return ", ".join(names)
