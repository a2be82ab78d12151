"""rlft.data: reading files, validating the OpenAI formats, assistant-only loss masks, packing, collation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from rlft.data import (
    ChatExample,
    DataError,
    PreferenceExample,
    PromptCompletionExample,
    RFTPrompt,
    Row,
    TokenizedExample,
    collate,
    load_examples,
    normalize_loss_weights,
    pack,
    parse_preference,
    parse_rft,
    parse_sft,
    read_rows,
    tokenize_chat,
    tokenize_prompt,
    tokenize_prompt_completion,
    tokenize_sft_examples,
)

CHATML_WITH_GENERATION_TAGS = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML = CHATML_WITH_GENERATION_TAGS.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "It is 9.", "weight": 0},
    {"role": "user", "content": "Wrong, try again."},
    {"role": "assistant", "content": "Sorry, it is 8."},
]


def _tokenizer(chat_template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [message["content"] for message in CONVERSATION] + ["system user assistant tool", "hello world"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=chat_template
    )


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE tokenizer with a ChatML template whose assistant turns are in generation blocks."""
    return _tokenizer(CHATML_WITH_GENERATION_TAGS)


@pytest.fixture(scope="module")
def tokenizer_without_tags():
    """The same tokenizer and template without generation blocks (the fallback path)."""
    return _tokenizer(CHATML)


def write_jsonl(path: Path, lines: list[dict | str]) -> str:
    """Write rows (dicts as JSON, strings verbatim) one a line; return the path as a string."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


GOOD_CHAT = {"messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]}


def first_error(path: str, parse=parse_sft) -> DataError:
    with pytest.raises(DataError) as caught:
        load_examples(path, parse)
    return caught.value


def messages_with(index: int, **changes) -> dict:
    """GOOD_CHAT with message ``index`` changed (a value of None removes the key)."""
    messages = [dict(m) for m in GOOD_CHAT["messages"]]
    messages[index].update(changes)
    messages[index] = {k: v for k, v in messages[index].items() if v is not None}
    return {"messages": messages}


# --------------------------------------------------------------------------------------------------------------
# Formats and validation


def test_chat_row_keeps_messages_and_per_message_weights():
    example = parse_sft(Row({"messages": CONVERSATION, "metadata": {"id": 1}}, "f.jsonl:1"))
    assert isinstance(example, ChatExample)
    assert example.turn_weights == [0, 0, 1, 0, 0, 0, 1]
    assert all("weight" not in m for m in example.messages)
    assert example.messages[4] == {"role": "assistant", "content": "It is 9."}
    assert example.where == "f.jsonl:1"


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"messages": "hi"}, "messages", "expected a non-empty list of messages, got a string"),
        ({"messages": []}, "messages", "expected a non-empty list of messages, got an empty list"),
        ({"mesages": GOOD_CHAT["messages"]}, "messages", "missing"),
        ({**GOOD_CHAT, "metadta": {}}, "metadta", "unknown key"),
        ({"messages": ["hi"]}, "messages[0]", "expected a message object, got a string"),
        (messages_with(0, role=None), "messages[0].role", "missing"),
        (messages_with(0, role="bot"), "messages[0].role", "must be one of system, user, assistant, tool, got 'bot'"),
        (messages_with(1, content=5), "messages[1].content", "expected a string, got a number"),
        (messages_with(1, content=None), "messages[1].content", "missing"),
        (messages_with(1, contnet="5"), "messages[1].contnet", "unknown key"),
        (messages_with(1, role="user"), "messages", "no assistant message"),
        (messages_with(1, weight=2), "messages[1].weight", "must be 0 or 1, got 2"),
        (messages_with(1, weight=True), "messages[1].weight", "must be 0 or 1, got True"),
        (messages_with(0, weight=1), "messages[0].weight", "only assistant messages"),
        (messages_with(1, weight=0), "messages", "every assistant message has weight 0"),
    ],
)
def test_malformed_chat_rows_name_file_line_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_CHAT, "", row])
    error = first_error(path)
    assert (error.where, error.field) == (f"{path}:3", field)
    assert str(error).startswith(f"{path}:3: {field}: ")
    assert problem in error.problem


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"messages": [', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ("7", "expected a JSON object, got a number"),
    ],
)
def test_lines_that_are_not_json_objects_are_errors_at_their_line(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_CHAT, line])
    error = first_error(path)
    assert str(error).startswith(f"{path}:2: {problem}")


def test_missing_path_and_unknown_kind_of_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"^{missing}: no such file"):
        read_rows(missing)
    csv = tmp_path / "train.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported kind of file '\.csv'; expected a \.jsonl file, a \.parquet"):
        read_rows(str(csv))


def test_skip_mode_drops_and_counts_bad_rows(tmp_path):
    bad_role = messages_with(0, role="bot")
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_CHAT, "{oops", "[]", bad_role, GOOD_CHAT])
    loaded = load_examples(path, parse_sft, on_bad_row="skip")
    assert (len(loaded.examples), loaded.num_rows, loaded.num_skipped) == (2, 5, 3)
    assert [e.split(": ")[0] for e in loaded.errors] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert loaded.errors[2].startswith(f"{path}:4: messages[0].role: must be one of")


def test_a_file_without_valid_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["{oops", messages_with(1, role="user")])
    with pytest.raises(DataError, match=f"^{path}: no valid rows \\(2 read, 2 skipped\\); first problem: {path}:1"):
        load_examples(path, parse_sft, on_bad_row="skip")


def test_limit_stops_after_that_many_examples(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_CHAT] * 3 + ["{oops"])
    loaded = load_examples(path, parse_sft, limit=2)
    assert (len(loaded.examples), loaded.num_rows) == (2, 2)


def test_prompt_completion_rows():
    text = parse_sft(Row({"prompt": "2 + 3 =", "completion": " 5"}, "f:1"))
    assert text == PromptCompletionExample("2 + 3 =", " 5", "f:1")
    user, assistant = GOOD_CHAT["messages"]
    conversational = parse_sft(Row({"prompt": [user], "completion": [assistant]}, "f:2"))
    assert conversational == PromptCompletionExample([user], [assistant], "f:2")
    with pytest.raises(DataError, match=r"^f:3: completion\[0\].role: must be 'assistant' in a response, got 'user'"):
        parse_sft(Row({"prompt": [user], "completion": [user]}, "f:3"), format="prompt_completion")
    with pytest.raises(DataError, match="^f:4: completion: expected a string like 'prompt', got an array"):
        parse_sft(Row({"prompt": "2 + 3 =", "completion": [assistant]}, "f:4"))
    with pytest.raises(DataError, match="^f:5: completion: missing"):
        parse_sft(Row({"prompt": "2 + 3 ="}, "f:5"))
    with pytest.raises(DataError, match="^f:6: prompt: unknown key"):
        parse_sft(Row({"prompt": "2 + 3 =", "completion": " 5"}, "f:6"), format="chat")


def test_preference_rows():
    user = {"role": "user", "content": "2 + 3?"}
    good, bad = {"role": "assistant", "content": "5"}, {"role": "assistant", "content": "6"}
    openai = {"input": {"messages": [user]}, "preferred_output": [good], "non_preferred_output": [bad]}
    expected = PreferenceExample([user], [good], [bad], "f:1")
    assert parse_preference(Row(openai, "f:1")) == expected
    assert parse_preference(Row({"prompt": "2 + 3?", "chosen": "5", "rejected": "6"}, "f:1")) == expected
    assert parse_preference(Row({"prompt": [user], "chosen": [good], "rejected": [bad]}, "f:1")) == expected

    cases = [
        ({**openai, "preferred_output": [user]}, "preferred_output[0].role", "must be 'assistant'"),
        ({k: v for k, v in openai.items() if k != "non_preferred_output"}, "non_preferred_output", "missing"),
        ({**openai, "input": [user]}, "input", "expected an object with 'messages', got an array"),
        ({**openai, "input": {"messages": [user, good]}}, "input.messages[1].role", "a prompt must not end with"),
        ({**openai, "input": {"messages": [user], "tols": []}}, "input.tols", "unknown key"),
        ({"prompt": "2 + 3?", "chosen": 5, "rejected": "6"}, "chosen", "expected a non-empty list"),
    ]
    for row, field, problem in cases:
        with pytest.raises(DataError) as caught:
            parse_preference(Row(row, "f:7"))
        assert str(caught.value).startswith(f"f:7: {field}: {problem}")


def test_rft_prompt_rows_keep_other_fields_for_graders():
    user = {"role": "user", "content": "2 + 3?"}
    prompt = parse_rft(Row({"messages": [user], "answer": 5, "id": "a"}, "f:1"))
    assert prompt == RFTPrompt([user], {"answer": 5, "id": "a"}, "f:1")
    with pytest.raises(DataError, match=r"^f:2: messages\[1\].role: a prompt must not end with an assistant"):
        parse_rft(Row({"messages": [user, {"role": "assistant", "content": "5"}]}, "f:2"))
    with pytest.raises(DataError, match=r"^f:3: messages\[0\].weight: only assistant messages of SFT chat rows"):
        parse_rft(Row({"messages": [{**user, "weight": 1}]}, "f:3"))


def test_jsonl_parquet_and_datasets_dir_give_the_same_examples(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 1}]},
    ]
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    parquet = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    dataset_dir, dataset_dict_dir = str(tmp_path / "ds"), str(tmp_path / "dsdict")
    datasets.Dataset.from_list(rows).save_to_disk(dataset_dir)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(dataset_dict_dir)

    def examples(path: str) -> list[ChatExample]:
        return load_examples(path, parse_sft).examples

    from_jsonl = examples(jsonl)
    assert [e.where for e in from_jsonl] == [f"{jsonl}:1", f"{jsonl}:2"]
    for path in (parquet, dataset_dir, dataset_dict_dir):
        loaded = examples(path)
        assert [e.where for e in loaded] == [f"{path}:row 0", f"{path}:row 1"]
        assert [dataclasses.replace(e, where="") for e in loaded] == [
            dataclasses.replace(e, where="") for e in from_jsonl
        ]

    no_train_dir = str(tmp_path / "no_train")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(no_train_dir)
    with pytest.raises(DataError, match=r"without a 'train' split \(splits: test\)"):
        read_rows(no_train_dir)


# --------------------------------------------------------------------------------------------------------------
# Tokenization and loss masks


def weighted_spans(tokenizer, tokenized: TokenizedExample) -> list[str]:
    """The decoded text of each run of tokens with loss weight 1."""
    spans, current = [], []
    for token, weight in zip(tokenized.input_ids + [None], tokenized.loss_weights + [0.0]):
        if weight:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans


def chat_example(messages: list[dict]) -> ChatExample:
    return parse_sft(Row({"messages": messages}, "f:1"))


def test_loss_is_on_assistant_tokens_of_weighted_turns_only(tokenizer):
    example = chat_example(CONVERSATION)
    tokenized = tokenize_chat(example.messages, example.turn_weights, tokenizer, max_seq_len=512)
    assert weighted_spans(tokenizer, tokenized) == ["It is 5.<|im_end|>", "Sorry, it is 8.<|im_end|>"]
    assert set(tokenized.loss_weights) == {0.0, 1.0}
    assert tokenizer.decode(tokenized.input_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert not tokenized.truncated


def test_template_without_generation_tags_gives_the_same_mask(tokenizer, tokenizer_without_tags):
    example = chat_example(CONVERSATION)
    with_tags = tokenize_chat(example.messages, example.turn_weights, tokenizer, max_seq_len=512)
    fallback = tokenize_chat(example.messages, example.turn_weights, tokenizer_without_tags, max_seq_len=512)
    assert fallback == with_tags


def test_template_that_rewrites_earlier_turns_is_a_data_error(tokenizer):
    counting = _tokenizer("{{- messages | length }}" + CHATML)
    example = chat_example(CONVERSATION)
    with pytest.raises(DataError, match=r"^f:1: messages: messages\[2\]: rendering the conversation turn by turn"):
        tokenize_sft_examples([example], counting, max_seq_len=512)


def test_raw_prompt_completion_learns_completion_and_eos(tokenizer):
    tokenized = tokenize_prompt_completion("2 + 3 =", " 5", tokenizer, max_seq_len=64)
    assert weighted_spans(tokenizer, tokenized) == [" 5<|im_end|>"]
    assert tokenizer.decode(tokenized.input_ids) == "2 + 3 = 5<|im_end|>"
    nothing_before = tokenize_prompt_completion("", "5", tokenizer, max_seq_len=64)
    assert nothing_before.loss_weights[0] == 0.0  # nothing predicts a sequence's first token


def test_conversational_prompt_completion_uses_the_chat_template(tokenizer):
    user, assistant = GOOD_CHAT["messages"]
    tokenized = tokenize_prompt_completion([user], [assistant], tokenizer, max_seq_len=64)
    assert tokenized == tokenize_chat([user, assistant], [0.0, 1.0], tokenizer, max_seq_len=64)
    assert weighted_spans(tokenizer, tokenized) == ["5<|im_end|>"]


def test_generation_prompt_ends_with_the_assistant_header(tokenizer):
    prompt_ids = tokenize_prompt(GOOD_CHAT["messages"][:1], tokenizer)
    assert tokenizer.decode(prompt_ids) == "<|im_start|>user\n2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def test_truncation_keeps_the_head_and_drop_removes_long_rows(tokenizer):
    example = chat_example(CONVERSATION)
    full = tokenize_chat(example.messages, example.turn_weights, tokenizer, max_seq_len=512)
    cut = len(full.input_ids) - 3
    truncated = tokenize_chat(example.messages, example.turn_weights, tokenizer, max_seq_len=cut)
    assert truncated.truncated
    assert truncated.input_ids == full.input_ids[:cut]
    assert truncated.loss_weights == full.loss_weights[:cut]

    short = chat_example(GOOD_CHAT["messages"])
    no_loss_left = len(tokenize_prompt(short.messages[:1], tokenizer))  # cut right after the assistant header
    kept, num_dropped, num_truncated = tokenize_sft_examples([example, short], tokenizer, max_seq_len=cut)
    assert (len(kept), num_dropped, num_truncated) == (2, 0, 1)
    kept, num_dropped, num_truncated = tokenize_sft_examples([example, short], tokenizer, cut, on_long_row="drop")
    assert (len(kept), num_dropped, num_truncated) == (1, 1, 0)
    kept, num_dropped, num_truncated = tokenize_sft_examples([short], tokenizer, max_seq_len=no_loss_left)
    assert (len(kept), num_dropped, num_truncated) == (0, 1, 0)


def test_embedded_tiny_tokenizer_masks_assistant_tokens():
    from rlft.tiny.tokenizer import build_tokenizer

    tiny_tokenizer = build_tokenizer()
    example = chat_example(CONVERSATION)
    tokenized = tokenize_chat(example.messages, example.turn_weights, tiny_tokenizer, max_seq_len=512)
    assert weighted_spans(tiny_tokenizer, tokenized) == ["It is 5.<|im_end|>", "Sorry, it is 8.<|im_end|>"]


# --------------------------------------------------------------------------------------------------------------
# Packing and collation


def example_of(length: int, start: int = 0) -> TokenizedExample:
    return TokenizedExample(list(range(start, start + length)), [0.0] + [1.0] * (length - 1))


def test_pack_fills_rows_best_fit_and_restarts_positions():
    examples = [example_of(n, start=10 * i) for i, n in enumerate([5, 6, 3, 2, 4, 8])]
    rows = pack(examples, max_seq_len=8)
    assert [len(row.input_ids) for row in rows] == [8, 8, 4, 8]
    assert rows[0].input_ids == list(range(0, 5)) + list(range(20, 23))
    assert rows[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[1].input_ids == list(range(10, 16)) + list(range(30, 32))
    assert sorted(t for row in rows for t in row.input_ids) == sorted(t for e in examples for t in e.input_ids)
    with pytest.raises(ValueError, match="an example of 9 tokens does not fit in rows of max_seq_len=8"):
        pack([example_of(9)], max_seq_len=8)


def test_collate_pads_right_with_zero_weight():
    batch = collate([example_of(3), example_of(5)], pad_id=99)
    assert batch.input_ids_BT.tolist() == [[0, 1, 2, 99, 99], [0, 1, 2, 3, 4]]
    assert batch.attention_mask_BT.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.position_ids_BT.tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]
    assert batch.loss_weights_BT.tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert batch.loss_weights_BT.dtype == torch.float32
    assert batch.input_ids_BT.dtype == batch.attention_mask_BT.dtype == batch.position_ids_BT.dtype == torch.int64
    assert (batch.num_rows, batch.num_tokens) == (2, 8)


def test_normalized_loss_weights_sum_to_one_over_the_step():
    batch = collate([example_of(3), example_of(5)], pad_id=0)
    assert float(normalize_loss_weights(batch).loss_weights_BT.sum()) == pytest.approx(1.0)
    half = normalize_loss_weights(batch, total_weight=12.0)
    assert float(half.loss_weights_BT.sum()) == pytest.approx(0.5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_rows_give_the_same_logits_as_separate_examples(tokenizer, attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == attn_implementation
    conversations = [CONVERSATION[:3], CONVERSATION[:5], GOOD_CHAT["messages"], CONVERSATION[1:3]]
    examples = [chat_example(messages) for messages in conversations]
    tokenized, _, _ = tokenize_sft_examples(examples, tokenizer, max_seq_len=128)
    rows = pack(tokenized, max_seq_len=96)
    assert len(rows) < len(tokenized)

    def logits(batch):
        with torch.no_grad():
            return model(**batch.model_inputs()).logits

    alone = [logits(collate([example], tokenizer.pad_token_id))[0] for example in tokenized]
    for batch_rows in (rows, tokenized):  # packed rows, then one example a row with right padding
        logits_BTV = logits(collate(batch_rows, tokenizer.pad_token_id))
        found = 0
        for b, row in enumerate(batch_rows):
            starts = [t for t, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
            for start, stop in zip(starts, starts[1:]):
                i = next(i for i, e in enumerate(tokenized) if e.input_ids == row.input_ids[start:stop])
                torch.testing.assert_close(logits_BTV[b, start:stop], alone[i], atol=1e-5, rtol=1e-5)
                found += 1
        assert found == len(tokenized)


def test_a_generic_fast_tokenizer_loads_as_autotokenizer_loads_it_and_the_driver_skips_the_model_registry(
        tiny_model_dir, tmp_path):
    """``load_tokenizer`` gives the tiny model's tokenizer exactly as AutoTokenizer does, and importing the
    controllers and loading it imports neither transformers' model registry nor torch._dynamo (over 2 s of every
    driver's start). A model directory naming a model-specific class goes through AutoTokenizer."""
    from transformers import AutoTokenizer

    from rlft.data import load_tokenizer
    from test_config import run_and_list_heavy_imports

    code = ("import rlft.controller.grpo, rlft.controller.ppo, rlft.controller.sft, rlft.controller.dpo\n"
            "from rlft.data import load_tokenizer\n"
            f"load_tokenizer({tiny_model_dir!r})")
    _, imported = run_and_list_heavy_imports(code, modules=("transformers.models.auto.modeling_auto", "torch._dynamo"))
    assert imported == []

    ours, auto = load_tokenizer(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(ours) is type(auto)
    conversation = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert ours.apply_chat_template(conversation, tokenize=False) == auto.apply_chat_template(conversation, tokenize=False)
    assert ours.get_vocab() == auto.get_vocab()
    assert (ours.pad_token_id, ours.eos_token_id) == (auto.pad_token_id, auto.eos_token_id)

    specific = tmp_path / "specific"
    specific.mkdir()
    (specific / "tokenizer.json").write_bytes((Path(tiny_model_dir) / "tokenizer.json").read_bytes())
    config = json.loads((Path(tiny_model_dir) / "tokenizer_config.json").read_text())
    (specific / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    assert type(load_tokenizer(str(specific))).__name__ == "Qwen2Tokenizer"
