"""Grader configuration: which graders score each sample, their weights, and the pool of workers that runs them.

The ``graders:`` section of a run's config. Every grader default lives here. ``validate_graders`` checks a config
before any actor starts, with errors that name the dotted field and the grader::

    graders.items[1].pattern: invalid regex in grader 'format': missing ), unterminated subpattern at position 0
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn

from rlft.errors import ConfigError, DataError
from rlft.graders.openai_spec import _TEMPLATE, parse_spec
from rlft.graders.sandbox import PythonGraderLimits
from rlft.sandbox import SANDBOX_MODES, SandboxMode

GraderType = Literal["exact_match", "math", "regex", "python_function", "openai", "reward_model"]


@dataclass
class GraderItemConfig:
    """One grader. Fields after ``weight`` belong to the types named in their comments; other types ignore them."""

    # Keys the grader's scores in results and metrics (``graders/<name>/mean``); unique within ``graders.items``.
    name: str = ""
    type: GraderType = "exact_match"
    # A sample's reward is the sum over graders of weight × score.
    weight: float = 1.0
    # exact_match, math: the item field (a key of the prompt row besides ``messages``) holding the reference answer.
    answer_field: str = "answer"
    # exact_match: compare case-sensitively. Both sides are always stripped of surrounding whitespace.
    case_sensitive: bool = True
    # regex: a Python regular expression; inline flags such as ``(?s)`` let ``.`` cross newlines.
    pattern: str = ""
    # regex: ``search`` finds the pattern anywhere in the completion; ``fullmatch`` needs it to match all of it.
    regex_mode: Literal["search", "fullmatch"] = "search"
    # python_function: ``"module:function"``, called TRL-style once per worker batch as
    # ``fn(prompts, completions, **extra_columns) -> list of numbers`` (prompts are message lists, each extra
    # field a list with one value per sample, None where a row lacks it).
    function: str = ""
    # openai: a grader in OpenAI's reinforcement fine-tuning JSON (string_check, text_similarity, python, multi),
    # inline, or ``spec_file``: a path to that JSON. See ``rlft.graders.openai_spec``.
    spec: dict = field(default_factory=dict)
    spec_file: str = ""
    # openai score_model / label_model: base URL of the OpenAI-compatible server that hosts the judge (e.g. a vLLM
    # server: http://127.0.0.1:8000/v1); the API key is read from the environment variable ``api_key_env``.
    endpoint: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    # reward_model: a local Hugging Face sequence-classification model (score = its first logit on prompt +
    # completion), served by ``num_replicas`` actors of its own, in batches of ``batch_size``.
    model_path: str = ""
    num_replicas: int = 1
    batch_size: int = 32
    max_length: int = 1024
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0


@dataclass
class GraderConfig:
    items: list[GraderItemConfig] = field(default_factory=lambda: [GraderItemConfig(name="exact_match")])
    # Grader actors, sized independently of rollout workers; each scores its share of a batch.
    num_grader_workers: int = 1
    num_cpus_per_worker: float = 1.0
    # Requests one worker keeps open at once against a judge's endpoint (openai score_model / label_model).
    concurrency_per_worker: int = 8
    # Seconds one grader may spend on one worker's share of a batch (a user function: its one call; a built-in
    # grader: all the share's samples). Samples not scored by then get ``fallback_score`` and count as timeouts.
    timeout_s: float = 10.0
    # The score a grader gives a sample when it raises, times out, or returns something other than a finite number.
    fallback_score: float = 0.0
    # Stop the job when one grader fails (errors, timeouts, invalid values) on more than this share of a step's
    # samples; the message names the grader and gives its first error. The default tolerates a flaky judge but
    # stops a grader that fails on most samples (a typo in a template, a missing field); 1.0 never stops.
    max_error_rate: float = 0.5
    # Sandbox of ``python`` graders (OpenAI spec): one throw-away process per worker share, with these limits. Its
    # wall-clock limit is ``timeout_s`` less a margin (1 s, or a quarter of ``timeout_s`` if shorter), so that the
    # scores it finished are back before the worker stops waiting. ``namespaces``: user, mount, network and PID
    # namespaces the OS enforces (the default; refused with a clear error where the host has no user namespaces).
    # ``audit_hook_only``: rlimits and an audit hook, no OS boundary; used only where it is asked for by name.
    sandbox: SandboxMode = "namespaces"
    python_memory_mib: int = 1024
    python_cpu_seconds: int = 10
    python_max_source_bytes: int = 65536
    # A grader worker whose resident memory (its process and the sandboxes it started) passes this after a share is
    # replaced, counted in ``graders/memory_replacements``; 0 never replaces. ``graders/worker_memory_mib`` is logged.
    max_worker_memory_mib: int = 4096


def validate_graders(cfg: GraderConfig, path: str = "graders") -> None:
    """Check ``cfg`` (found at ``path`` in the run config) before any actor starts; raises ``ConfigError``.

    Compiles every regex and imports every user function, so a typo stops the run here, not mid-training.
    """
    if not cfg.items:
        _fail(f"{path}.items", "at least one grader is needed")
    if cfg.num_grader_workers < 1:
        _fail(f"{path}.num_grader_workers", f"must be at least 1, got {cfg.num_grader_workers}")
    if cfg.num_cpus_per_worker < 0:
        _fail(f"{path}.num_cpus_per_worker", f"must not be negative, got {cfg.num_cpus_per_worker}")
    if not (math.isfinite(cfg.timeout_s) and cfg.timeout_s > 0):
        _fail(f"{path}.timeout_s", f"must be a positive number of seconds, got {cfg.timeout_s}")
    if not math.isfinite(cfg.fallback_score):
        _fail(f"{path}.fallback_score", f"must be a finite number, got {cfg.fallback_score}")
    if not 0.0 <= cfg.max_error_rate <= 1.0:
        _fail(f"{path}.max_error_rate", f"must be between 0 and 1, got {cfg.max_error_rate}")
    if cfg.sandbox not in SANDBOX_MODES:
        _fail(f"{path}.sandbox", f"must be one of {', '.join(SANDBOX_MODES)}, got {cfg.sandbox!r}")
    if cfg.max_worker_memory_mib < 0:
        _fail(f"{path}.max_worker_memory_mib", f"must be 0 (off) or a number of MiB, got {cfg.max_worker_memory_mib}")
    for name in ("python_memory_mib", "python_cpu_seconds", "python_max_source_bytes", "concurrency_per_worker"):
        if getattr(cfg, name) <= 0:
            _fail(f"{path}.{name}", f"must be positive, got {getattr(cfg, name)}")
    first_with_name: dict[str, int] = {}
    for i, item in enumerate(cfg.items):
        where = f"{path}.items[{i}]"
        if item.name in first_with_name:
            _fail(f"{where}.name", f"{item.name!r} is already the name of {path}.items[{first_with_name[item.name]}]")
        first_with_name[item.name] = i
        _validate_item(item, where, cfg)


def sandbox_limits(cfg: GraderConfig) -> PythonGraderLimits:
    return PythonGraderLimits(
        wall_timeout_s=cfg.timeout_s - min(1.0, cfg.timeout_s / 4),
        cpu_seconds=cfg.python_cpu_seconds,
        memory_mib=cfg.python_memory_mib,
        mode=cfg.sandbox,
        max_source_bytes=cfg.python_max_source_bytes,
    )


def api_key_of(item: GraderItemConfig) -> str:
    """The judge endpoint's API key (local servers accept any)."""
    return os.environ.get(item.api_key_env, "") or "EMPTY"


def load_spec(item: GraderItemConfig) -> dict:
    """The OpenAI grader JSON of an ``openai`` item: ``spec`` inline, or read from ``spec_file``."""
    if item.spec_file:
        return json.loads(Path(item.spec_file).read_text())
    return item.spec


def load_function(path: str) -> Callable:
    """The callable named by ``"module:function"``, imported now (import errors propagate as they are)."""
    module_name, sep, attribute = path.partition(":")
    if not (sep and module_name and attribute):
        raise ValueError("expected 'module:function', e.g. 'my_rewards:format_reward'")
    fn = getattr(importlib.import_module(module_name), attribute)
    if not callable(fn):
        raise TypeError(f"{path} is a {type(fn).__name__}, not a function")
    return fn


def _validate_item(item: GraderItemConfig, where: str, cfg: GraderConfig) -> None:
    if not item.name:
        _fail(f"{where}.name", "every grader needs a name (it keys the grader's scores and metrics)")
    grader = f"grader {item.name!r}"
    if not math.isfinite(item.weight):
        _fail(f"{where}.weight", f"{grader}: must be a finite number, got {item.weight}")
    if item.pattern and item.type != "regex":
        _fail(f"{where}.pattern", f"{grader}: only regex graders use a pattern (type is {item.type!r})")
    if item.function and item.type != "python_function":
        _fail(f"{where}.function", f"{grader}: only python_function graders use a function (type is {item.type!r})")
    if item.type in ("exact_match", "math") and not item.answer_field:
        _fail(f"{where}.answer_field", f"{grader}: empty; name the item field holding the reference answer")
    if item.type == "regex":
        if not item.pattern:
            _fail(f"{where}.pattern", f"{grader}: a regex grader needs a pattern")
        try:
            re.compile(item.pattern)
        except re.error as exc:
            _fail(f"{where}.pattern", f"invalid regex in {grader}: {exc}")
    if (item.spec or item.spec_file) and item.type != "openai":
        _fail(f"{where}.spec", f"{grader}: only openai graders use a spec (type is {item.type!r})")
    if item.type == "openai":
        if bool(item.spec) == bool(item.spec_file):
            _fail(f"{where}.spec", f"{grader}: an openai grader needs exactly one of spec (inline JSON) or spec_file")
        try:
            spec = load_spec(item)
        except (OSError, ValueError) as exc:
            _fail(f"{where}.spec_file", f"{grader}: cannot read {item.spec_file!r}: {exc}")
        try:
            parse_spec(spec, sandbox_limits(cfg), f"{where}.spec", item.endpoint, api_key_of(item))
        except ValueError as exc:
            field_path, problem = str(exc).split(": ", 1)  # parse_spec names the JSON path first
            _fail(field_path, f"{grader}: {problem}")
    if item.model_path and item.type != "reward_model":
        _fail(f"{where}.model_path", f"{grader}: only reward_model graders use a model_path (type is {item.type!r})")
    if item.type == "reward_model":
        if not item.model_path or not Path(item.model_path).is_dir():
            _fail(f"{where}.model_path", f"{grader}: a reward_model grader needs a local model directory, "
                  f"got {item.model_path!r}")
        for name in ("num_replicas", "batch_size", "max_length"):
            if getattr(item, name) < 1:
                _fail(f"{where}.{name}", f"{grader}: must be at least 1, got {getattr(item, name)}")
    if item.type == "python_function":
        if not item.function:
            _fail(f"{where}.function", f"{grader}: a python_function grader needs 'module:function'")
        try:
            load_function(item.function)
        except Exception as exc:  # importing user code can raise anything; all of it is a config error here
            _fail(f"{where}.function", f"{grader} cannot load {item.function!r}: {type(exc).__name__}: {exc}")


def _fail(path: str, message: str) -> NoReturn:
    raise ConfigError(f"{path}: {message}")


# --------------------------------------------------------------------------------------------------------------
# The fields graders read from each row, checked against the first rows of the data before any actor starts.


def check_rows_have_grader_fields(cfg: GraderConfig, rows: list[tuple[str, dict]], path: str = "graders") -> None:
    """Check that each row has every item field the graders read: the ``answer_field`` of exact_match and math
    graders and each ``{{item.field}}`` template of openai graders. ``rows`` are ``(where, fields)`` pairs, the
    first rows of the training prompts (``RFTPrompt.where`` and ``.extra``). Raises ``DataError`` at the first row
    that lacks one, naming the grader, so a grader that would fail on every sample stops the run before it starts.
    """
    reads = [(field_path, f"{path}.items[{i}] (grader {item.name!r}) reads it {how}")
             for i, item in enumerate(cfg.items) for field_path, how in _item_fields_read(item, f"{path}.items[{i}]")]
    for where, fields in rows:
        for field_path, reader in reads:
            node = fields
            for part in field_path.split("."):
                if not (isinstance(node, dict) and part in node):
                    raise DataError(where, field_path, f"missing; {reader}")
                node = node[part]


def _item_fields_read(item: GraderItemConfig, where: str) -> list[tuple[str, str]]:
    """``(field path, how it is read)`` for each item field a grader needs in every row."""
    if item.type in ("exact_match", "math"):
        return [(item.answer_field, f"as its answer_field ({where}.answer_field)")]
    if item.type != "openai":
        return []  # python_function graders get None where a row lacks a field; python graders read what they like
    found: list[tuple[str, str]] = []

    def walk(node, node_path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key != "source":  # a python grader's code, not a template
                    walk(value, f"{node_path}.{key}")
        elif isinstance(node, list):
            for k, value in enumerate(node):
                walk(value, f"{node_path}[{k}]")
        elif isinstance(node, str):
            for match in _TEMPLATE.finditer(node):
                head, _, field_path = match.group(1).partition(".")
                if head == "item" and field_path:
                    found.append((field_path, f"in the template {match.group(0)} at {node_path}"))

    walk(load_spec(item), f"{where}.spec")
    return found
