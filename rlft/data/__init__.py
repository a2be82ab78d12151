"""Training data: reading files, the OpenAI fine-tuning formats, chat templates with assistant-only loss, packing.

    rows = read_rows("train.jsonl")                                  # Row(data, where="train.jsonl:LINE")
    loaded = load_examples("train.jsonl", parse_sft)                 # validated, typed examples
    tokenized, num_dropped, num_truncated = tokenize_sft_examples(loaded.examples, tokenizer, max_seq_len=1024)
    batch = normalize_loss_weights(collate(pack(tokenized, 1024), tokenizer.pad_token_id))
    logits = model(**batch.model_inputs()).logits
"""

from rlft import lazy_names

# Each name loads its module on first use: reading and checking rows (``formats``, ``sources``) needs no torch, so
# ``rlft train`` checks a job's data before it loads torch or starts anything.
_MODULE_OF = {
    "TokenBatch": "batch",
    "ChatExample": "formats",
    "LoadedData": "formats",
    "PreferenceExample": "formats",
    "PromptCompletionExample": "formats",
    "RFTPrompt": "formats",
    "load_examples": "formats",
    "parse_preference": "formats",
    "parse_rft": "formats",
    "parse_sft": "formats",
    "PackedRow": "packing",
    "collate": "packing",
    "normalize_loss_weights": "packing",
    "pack": "packing",
    "DataError": "sources",
    "Row": "sources",
    "read_rows": "sources",
    "ChatTemplateError": "tokenize",
    "TokenizedExample": "tokenize",
    "load_tokenizer": "tokenize",
    "tokenize_chat": "tokenize",
    "tokenize_prompt": "tokenize",
    "tokenize_prompt_completion": "tokenize",
    "tokenize_sft_examples": "tokenize",
}

__all__ = sorted(_MODULE_OF)
__getattr__ = lazy_names(__name__, _MODULE_OF)
