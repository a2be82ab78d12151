"""Graders and the grader pool: each grader on good and bad input, config validation, and faults (a grader that
raises, hangs, returns garbage, or takes its worker down) scored as counted fallbacks, in-process and on Ray."""

from __future__ import annotations

import re
import time

import pytest

from rlft.config import ConfigError, _build
from rlft.graders import (
    GradeRequest,
    GraderConfig,
    GraderItemConfig,
    GraderPool,
    exact_match,
    math_match,
    regex_match,
    validate_graders,
)
from rlft.graders.pool import resident_mib, STUCK_MARGIN_S

FIXTURES = "tests.grader_fixtures"
# Slack for scheduling on a busy 2-core machine, on top of the time a call is allowed.
SLACK_S = 2.0
# Generous time for a replacement grader actor to start (a process, imports): over 6 s on a loaded 2-core machine.
STARTUP_S = 10.0


def item(name: str, type: str, **fields) -> GraderItemConfig:
    return GraderItemConfig(name=name, type=type, **fields)


def user_function(name: str, function: str, **fields) -> GraderItemConfig:
    return item(name, "python_function", function=f"{FIXTURES}:{function}", **fields)


def request(completion: str, answer: str = "82", **extra) -> GradeRequest:
    return GradeRequest([{"role": "user", "content": "What is 37+45?"}], completion, {"answer": answer, **extra})


def local_pool(*items: GraderItemConfig, **pool_fields) -> GraderPool:
    return GraderPool(GraderConfig(items=list(items), **pool_fields), local=True)


# --------------------------------------------------------------------------------------------------------------
# The graders


@pytest.mark.parametrize(
    ("completion", "answer", "case_sensitive", "score"),
    [
        ("82", "82", True, 1.0),
        ("83", "82", True, 0.0),
        ("  82\n", "82 ", True, 1.0),
        ("The answer is 82", "82", True, 0.0),
        ("Batik", "batik", True, 0.0),
        ("Batik", "batik", False, 1.0),
    ],
)
def test_exact_match(completion, answer, case_sensitive, score):
    assert exact_match(completion, answer, case_sensitive) == score


@pytest.mark.parametrize(
    ("completion", "answer", "score"),
    [
        ("0.5", "1/2", 1.0),
        ("1/2", "0.5", 1.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("The answer is $\\frac{1}{2}$.", "1/2", 1.0),
        ("0.5", "\\frac{1}{2}", 1.0),
        ("$1+x$", "x+1", 1.0),
        ("The answer is 82", "82", 1.0),
        ("0.51", "1/2", 0.0),
        ("no number here", "82", 0.0),
    ],
)
def test_math_match(completion, answer, score):
    assert math_match(completion, answer) == score


def test_math_match_rejects_an_unparsable_reference():
    with pytest.raises(ValueError, match="does not parse as math"):
        math_match("82", "")


@pytest.mark.parametrize(
    ("completion", "fullmatch", "score"),
    [
        ("<answer>82</answer>", False, 1.0),
        ("I think <answer>82</answer>", False, 1.0),
        ("I think <answer>82</answer>", True, 0.0),
        ("<answer>82</answer>", True, 1.0),
        ("82", False, 0.0),
    ],
)
def test_regex_match(completion, fullmatch, score):
    assert regex_match(completion, re.compile(r"<answer>\d+</answer>"), fullmatch) == score


# --------------------------------------------------------------------------------------------------------------
# Config


def test_config_builds_from_yaml_data():
    """What rlft/config.py's builder makes of a ``graders:`` mapping: nested, typed, defaults filled in."""
    cfg = _build(
        GraderConfig,
        {"items": [{"name": "format", "type": "regex", "pattern": "^<answer>", "weight": 2}], "timeout_s": 3},
        "graders",
    )
    assert cfg.items == [GraderItemConfig(name="format", type="regex", pattern="^<answer>", weight=2.0)]
    assert cfg.timeout_s == 3.0
    validate_graders(cfg)
    with pytest.raises(ConfigError, match=r"graders\.items\[0\]\.type: expected one of"):
        _build(GraderConfig, {"items": [{"name": "x", "type": "judge"}]}, "graders")


@pytest.mark.parametrize(
    ("items", "pool_fields", "message"),
    [
        (
            [item("exact", "exact_match"), item("format", "regex", pattern="(<answer>")],
            {},
            r"graders\.items\[1\]\.pattern: invalid regex in grader 'format': missing \)",
        ),
        (
            [item("reward", "python_function", function="no_such_module:score")],
            {},
            r"graders\.items\[0\]\.function: grader 'reward' cannot load 'no_such_module:score': ModuleNotFoundError",
        ),
        (
            [user_function("reward", "no_such_function")],
            {},
            r"graders\.items\[0\]\.function: grader 'reward' cannot load 'tests\.grader_fixtures:no_such_function'",
        ),
        ([item("reward", "python_function", function=FIXTURES)], {}, r"expected 'module:function'"),
        ([item("a", "exact_match"), item("a", "math")], {}, r"graders\.items\[1\]\.name: 'a' is already"),
        ([item("", "exact_match")], {}, r"graders\.items\[0\]\.name: every grader needs a name"),
        ([item("a", "exact_match", pattern="x")], {}, r"graders\.items\[0\]\.pattern: grader 'a': only regex"),
        ([item("a", "regex")], {}, r"graders\.items\[0\]\.pattern: grader 'a': a regex grader needs a pattern"),
        ([], {}, r"graders\.items: at least one grader"),
        ([item("a", "exact_match")], {"timeout_s": 0.0}, r"graders\.timeout_s: must be a positive"),
        ([item("a", "exact_match")], {"num_grader_workers": 0}, r"graders\.num_grader_workers: must be at least 1"),
    ],
)
def test_validation_names_the_field_and_the_grader(items, pool_fields, message):
    with pytest.raises(ConfigError, match=message):
        validate_graders(GraderConfig(items=items, **pool_fields))


# --------------------------------------------------------------------------------------------------------------
# The pool, in-process


def test_python_function_gets_prompts_completions_and_extra_columns():
    pool = local_pool(
        user_function("contains", "answer_in_completion"),
        user_function("bonus", "bonus_column"),
        num_grader_workers=2,
    )
    result = pool.grade([request("It is 82."), request("It is 81.", bonus=0.5), request("82", bonus=2)])
    assert result.scores == {"contains": [1.0, 0.0, 1.0], "bonus": [0.0, 0.5, 2.0]}
    assert result.rewards == [1.0, 0.5, 3.0]


def test_reward_is_the_weighted_sum_of_graders():
    pool = local_pool(
        item("correct", "exact_match", weight=1.0),
        item("format", "regex", pattern=r"\d+", regex_mode="fullmatch", weight=0.5),
        item("math", "math", weight=2.0),
    )
    result = pool.grade([request("82"), request("81"), request("eighty-two")])
    assert result.scores == {"correct": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0], "math": [1.0, 0.0, 0.0]}
    assert result.rewards == [3.5, 0.5, 0.0]
    assert result.metrics() == {
        "graders/errors": 0,
        "graders/timeouts": 0,
        "graders/invalid": 0,
        "graders/correct/mean": pytest.approx(1 / 3),
        "graders/format/mean": pytest.approx(2 / 3),
        "graders/math/mean": pytest.approx(1 / 3),
        "graders/worker_memory_mib": pytest.approx(resident_mib(), rel=0.5),
        "graders/memory_replacements": 0,
    }


def test_a_sample_that_breaks_a_builtin_grader_costs_only_itself():
    """A row without the answer field is an error for that sample; the others are scored."""
    pool = local_pool(item("correct", "exact_match"), fallback_score=-1.0)
    missing = GradeRequest([{"role": "user", "content": "What is 37+45?"}], "82", {})
    result = pool.grade([request("82"), missing, request("81")])
    assert result.scores["correct"] == [1.0, -1.0, 0.0]
    assert (result.num_errors, result.num_timeouts, result.num_invalid) == (1, 0, 0)


@pytest.mark.parametrize(
    ("function", "counter"),
    [
        ("raises", "num_errors"),
        ("sleeps", "num_timeouts"),
        ("returns_nan", "num_invalid"),
        ("returns_strings", "num_invalid"),
        ("returns_too_few", "num_invalid"),
    ],
)
def test_a_faulty_user_grader_costs_its_score_not_the_job(function, counter):
    timeout_s = 0.5
    pool = local_pool(
        item("correct", "exact_match"),
        user_function("faulty", function, weight=0.5),
        fallback_score=-1.0,
        timeout_s=timeout_s,
        max_error_rate=1.0,  # it fails on every sample, which would stop the job by default
    )
    requests = [request("82"), request("81"), request("82")]
    for _ in range(2):  # a later call on the same pool works the same way
        start = time.monotonic()
        result = pool.grade(requests)
        assert time.monotonic() - start < timeout_s + SLACK_S
        assert result.scores == {"correct": [1.0, 0.0, 1.0], "faulty": [-1.0, -1.0, -1.0]}
        assert result.rewards == [0.5, -0.5, 0.5]
        counters = {name: getattr(result, name) for name in ("num_errors", "num_timeouts", "num_invalid")}
        assert counters == {name: 3 if name == counter else 0 for name in counters}


# --------------------------------------------------------------------------------------------------------------
# The pool on Ray


@pytest.mark.ray
def test_ray_pool_gives_the_local_result_and_streams(ray_cluster):
    cfg = GraderConfig(
        items=[
            item("correct", "exact_match"),
            item("math", "math", weight=0.5),
            item("format", "regex", pattern=r"\d"),
            user_function("contains", "answer_in_completion"),
            user_function("bonus", "bonus_column"),
            user_function("raises", "raises"),
            user_function("nan", "returns_nan"),
        ],
        num_grader_workers=2,
        num_cpus_per_worker=0.5,
        fallback_score=-1.0,
        max_error_rate=1.0,  # "raises" and "nan" fail on every sample
    )
    batches = [
        [request("82"), request("0.5", answer="1/2", bonus=1.0), request("It is 82"), request("none")],
        [request("81", bonus=0.25), request("\\frac{1}{2}", answer="0.5"), request("82")],
    ]
    local = GraderPool(cfg, local=True)
    pool = GraderPool(cfg)
    try:
        expected = [local.grade(batch) for batch in batches]
        assert expected[0].scores["math"] == [1.0, 1.0, 1.0, 0.0]
        assert (expected[0].num_errors, expected[0].num_invalid, expected[0].num_timeouts) == (4, 4, 0)
        assert [pool.grade(batch) for batch in batches] == expected
        handles = [pool.submit(batch) for batch in batches]
        assert [pool.collect(handle) for handle in reversed(handles)] == expected[::-1]
    finally:
        pool.shutdown()


@pytest.mark.slow  # waits out a hung worker's deadline
@pytest.mark.ray
def test_ray_worker_that_hangs_or_dies_is_replaced(ray_cluster):
    timeout_s = 1.0
    cfg = GraderConfig(
        items=[user_function("moody", "misbehaves_on_request")],
        num_grader_workers=1,
        num_cpus_per_worker=0.5,
        timeout_s=timeout_s,
        fallback_score=-1.0,
        max_error_rate=1.0,  # every sample of a share fails here
    )
    pool = GraderPool(cfg)
    try:

        def grade(completions: list[str], within_s: float):
            start = time.monotonic()
            result = pool.grade([request(c) for c in completions])
            assert time.monotonic() - start < within_s
            return result

        # A sleeping thread is abandoned at the worker's own deadline.
        slept = grade(["sleep", "82"], timeout_s + SLACK_S)
        assert slept.rewards == [-1.0, -1.0] and slept.num_timeouts == 2
        # A thread holding the GIL blocks the whole worker: the pool kills it at the share's deadline (which
        # starts once the replacement of the previous worker, the one with the abandoned thread, is up).
        hogged = grade(["hog", "82"], timeout_s + STUCK_MARGIN_S + STARTUP_S + SLACK_S)
        assert hogged.rewards == [-1.0, -1.0] and hogged.num_timeouts == 2
        # A worker that dies is replaced and the share resent once; dying again costs its samples.
        died = grade(["exit"], 2 * STARTUP_S + SLACK_S)
        assert died.rewards == [-1.0] and died.num_errors == 1
        # The job goes on, on replacement workers (this share waits for one to start, as the share before did).
        assert grade(["82", "81"], 2 * STARTUP_S + SLACK_S).rewards == [1.0, 1.0]
    finally:
        pool.shutdown()


@pytest.mark.ray
def test_ray_worker_over_its_memory_limit_is_replaced(ray_cluster):
    """A user function that leaks 256 MiB a call: the worker's memory is reported after every share, and the worker
    is replaced (and counted) after the share that takes it past graders.max_worker_memory_mib."""
    limit = 1200
    cfg = GraderConfig(items=[user_function("leaky", "leaks")], num_grader_workers=1, num_cpus_per_worker=0.5,
                       max_worker_memory_mib=limit)
    pool = GraderPool(cfg)
    try:
        results = [pool.grade([request("82")]) for _ in range(6)]
    finally:
        pool.shutdown()
    memory = [r.metrics()["graders/worker_memory_mib"] for r in results]
    replaced = [r.metrics()["graders/memory_replacements"] for r in results]
    assert all(r.rewards == [1.0] for r in results)
    assert replaced == [float(m > limit) for m in memory], (memory, replaced)
    assert sum(replaced) >= 1, memory
    first = replaced.index(1)
    assert memory[first] - memory[0] >= first * 200  # it grew by about 256 MiB a share
    if first + 1 < len(memory):
        assert memory[first + 1] < memory[first] - 200  # a fresh worker


@pytest.mark.ray
def test_ray_worker_runs_python_graders_in_the_namespace_sandbox(ray_cluster):
    """From a grader actor, as in a job: the grader sees its own uid, root and PID namespace."""
    source = ("import os\ndef grade(sample, item):\n"
              "    return float(os.getuid() == 1000 and os.getcwd() == '/sandbox' and not os.path.exists('/etc'))")
    spec = {"type": "python", "source": source}
    pool = GraderPool(GraderConfig(items=[GraderItemConfig(name="py", type="openai", spec=spec)], num_cpus_per_worker=0.5))
    try:
        assert pool.grade([request("82"), request("81")]).scores["py"] == [1.0, 1.0]
    finally:
        pool.shutdown()
