"""Training data: reading files, the OpenAI fine-tuning formats, chat templates with assistant-only loss, packing.

    rows = read_rows("train.jsonl")                                  # Row(data, where="train.jsonl:LINE")
    loaded = load_examples("train.jsonl", parse_sft)                 # validated, typed examples
    tokenized, num_dropped, num_truncated = tokenize_sft_examples(loaded.examples, tokenizer, max_seq_len=1024)
    batch = normalize_loss_weights(collate(pack(tokenized, 1024), tokenizer.pad_token_id))
    logits = model(**batch.model_inputs()).logits
"""

from rlft.data.batch import TokenBatch
from rlft.data.formats import (
    ChatExample,
    LoadedData,
    PreferenceExample,
    PromptCompletionExample,
    RFTPrompt,
    load_examples,
    parse_preference,
    parse_rft,
    parse_sft,
)
from rlft.data.packing import PackedRow, collate, normalize_loss_weights, pack
from rlft.data.sources import DataError, Row, read_rows
from rlft.data.tokenize import (
    ChatTemplateError,
    TokenizedExample,
    tokenize_chat,
    tokenize_prompt,
    tokenize_prompt_completion,
    tokenize_sft_examples,
)

__all__ = [
    "ChatExample",
    "ChatTemplateError",
    "DataError",
    "LoadedData",
    "PackedRow",
    "PreferenceExample",
    "PromptCompletionExample",
    "RFTPrompt",
    "Row",
    "TokenBatch",
    "TokenizedExample",
    "collate",
    "load_examples",
    "normalize_loss_weights",
    "pack",
    "parse_preference",
    "parse_rft",
    "parse_sft",
    "read_rows",
    "tokenize_chat",
    "tokenize_prompt",
    "tokenize_prompt_completion",
    "tokenize_sft_examples",
]
