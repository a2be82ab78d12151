"""Graders written in OpenAI's reinforcement fine-tuning grader JSON, run unchanged:

- ``string_check``: ``input`` vs ``reference`` with ``operation`` ``eq`` / ``ne`` / ``like`` (contains) / ``ilike``
  (contains, ignoring case) → 1.0 or 0.0;
- ``text_similarity``: ``evaluation_metric`` ``fuzzy_match`` (rapidfuzz), ``bleu`` (sacrebleu), ``gleu`` (nltk),
  ``meteor`` (nltk, needs its wordnet data), ``rouge_1`` .. ``rouge_5`` / ``rouge_l`` (rouge-score, F-measure) or
  ``cosine`` (mean-pooled hidden states of a local Hugging Face model, ``embedding_model``) → the similarity;
  ``pass_threshold`` is kept for reporting;
- ``python``: ``source`` defining ``grade(sample, item) -> float``, run in the sandbox (``rlft.graders.sandbox``);
- ``multi``: ``graders`` (name → grader) combined by ``calculate_output`` (``rlft.graders.expression``);
- ``score_model``: ``input`` chat messages (templates filled) sent to ``model`` on an OpenAI-compatible endpoint
  (a vLLM server the user runs: the grader item's ``endpoint``), the first number of the reply is the score, which
  must lie in ``range`` (default [0, 1]);
- ``label_model``: the same, the reply must be one of ``labels``; 1.0 when it is one of ``passing_labels``.

Templates ``{{item.field}}``, ``{{sample.output_text}}`` and ``{{sample.output_json.field}}`` (nested fields with
dots) are filled per sample. ``sample`` is ``{"output_text": completion, "output_json": the completion parsed as
JSON, or null}``; ``item`` is the data row's fields besides ``messages``.

``parse_spec(spec)`` checks a grader JSON before any actor starts (``ValueError`` naming the JSON path, e.g.
``graders.correct.operation``); ``SpecGrader.score(samples, items)`` returns one float or one ``GraderFailure`` per
sample.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from rlft.graders.expression import Expression, ExpressionError, compile_expression
from rlft.graders.sandbox import PythonGraderLimits, SandboxError, check_source, run_sandboxed
from rlft.sandbox import namespaces_unavailable

STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
SIMILARITY_METRICS = (
    "fuzzy_match", "bleu", "gleu", "meteor", "cosine", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
)
SUPPORTED_TYPES = ("string_check", "text_similarity", "python", "multi", "score_model", "label_model")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")


@dataclass(frozen=True)
class GraderFailure:
    """A sample this grader could not score, and why (counted as an error, scored ``fallback_score``)."""

    message: str


def sample_of(completion: str) -> dict:
    try:
        output_json = json.loads(completion)
    except (json.JSONDecodeError, ValueError):
        output_json = None
    return {"output_text": completion, "output_json": output_json}


def render(template: str, sample: dict, item: dict) -> str:
    """Fill ``{{item.x}}`` / ``{{sample.y}}`` placeholders; a missing field raises ``KeyError`` naming it."""

    def value(match: re.Match) -> str:
        path = match.group(1)
        parts = path.split(".")
        if parts[0] not in ("item", "sample"):
            raise KeyError(f"template {{{{{path}}}}}: must start with item. or sample.")
        node: Any = {"item": item, "sample": sample}[parts[0]]
        for part in parts[1:]:
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"template {{{{{path}}}}}: no field {part!r}")
            node = node[part]
        if isinstance(node, str):
            return node
        return json.dumps(node) if isinstance(node, (dict, list)) else str(node)

    return _TEMPLATE.sub(value, template)


class SpecGrader:
    """One grader of the spec (a ``multi`` holds others)."""

    def score(self, samples: list[dict], items: list[dict]) -> list[float | GraderFailure]:
        raise NotImplementedError


@dataclass
class StringCheck(SpecGrader):
    input: str
    reference: str
    operation: str

    def score(self, samples, items):
        return [_per_sample(lambda s, i: self._one(render(self.input, s, i), render(self.reference, s, i)), s, i)
                for s, i in zip(samples, items)]

    def _one(self, text: str, reference: str) -> float:
        if self.operation == "eq":
            return float(text == reference)
        if self.operation == "ne":
            return float(text != reference)
        if self.operation == "like":
            return float(reference in text)
        return float(reference.lower() in text.lower())


@dataclass
class TextSimilarity(SpecGrader):
    input: str
    reference: str
    metric: str
    pass_threshold: float | None
    embedding_model: str | None

    def __post_init__(self):
        self._measure = _similarity_function(self.metric, self.embedding_model)

    def score(self, samples, items):
        return [_per_sample(lambda s, i: self._measure(render(self.input, s, i), render(self.reference, s, i)), s, i)
                for s, i in zip(samples, items)]


@dataclass
class PythonGrader(SpecGrader):
    source: str
    limits: PythonGraderLimits

    def score(self, samples, items):
        results = run_sandboxed(self.source, list(zip(samples, items)), self.limits)
        return [GraderFailure(r.message) if isinstance(r, SandboxError) else r for r in results]


@dataclass
class Multi(SpecGrader):
    graders: dict[str, SpecGrader]
    expression: Expression

    def score(self, samples, items):
        parts = {name: grader.score(samples, items) for name, grader in self.graders.items()}
        out: list[float | GraderFailure] = []
        for k in range(len(samples)):
            values = {name: parts[name][k] for name in self.expression.names}
            failed = [f"{name}: {v.message}" for name, v in values.items() if isinstance(v, GraderFailure)]
            if failed:
                out.append(GraderFailure("; ".join(failed)))
                continue
            try:
                out.append(self.expression.evaluate(values))
            except ExpressionError as exc:
                out.append(GraderFailure(str(exc)))
        return out


@dataclass
class ModelGrader(SpecGrader):
    """``score_model`` / ``label_model``: a chat model on an OpenAI-compatible endpoint judges each sample."""

    kind: str
    model: str
    input: list[dict]
    endpoint: str
    api_key: str
    sampling: dict
    score_range: tuple[float, float]
    labels: list[str]
    passing_labels: list[str]
    timeout_s: float
    concurrency: int  # requests kept open against the endpoint

    def score(self, samples, items):
        from concurrent.futures import ThreadPoolExecutor

        from openai import OpenAI

        client = OpenAI(base_url=self.endpoint, api_key=self.api_key, timeout=self.timeout_s, max_retries=1)
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda pair: _per_sample(lambda s, i: self._one(client, s, i), *pair),
                                 zip(samples, items)))

    def _one(self, client, sample: dict, item: dict) -> float:
        messages = [{"role": m["role"], "content": render(m["content"], sample, item)} for m in self.input]
        reply = client.chat.completions.create(model=self.model, messages=messages, **self.sampling)
        text = (reply.choices[0].message.content or "").strip()
        if self.kind == "label_model":
            label = next((l for l in self.labels if text.lower() == l.lower()), None)
            if label is None:
                raise ValueError(f"the model replied {text!r:.80}, not one of the labels {self.labels}")
            return float(label in self.passing_labels)
        found = _NUMBER.search(text)
        if found is None:
            raise ValueError(f"the model replied {text!r:.80}, which holds no number")
        value = float(found.group())
        low, high = self.score_range
        if not low <= value <= high:
            raise ValueError(f"the model's score {value} is outside the range [{low}, {high}]")
        return value


def parse_spec(
    spec: dict,
    limits: PythonGraderLimits,
    path: str = "spec",
    endpoint: str = "",
    api_key: str = "EMPTY",
    concurrency: int = 8,
) -> SpecGrader:
    """Build a grader from OpenAI's JSON form, checking every field; errors name the JSON path."""

    def need(key: str, kind: type = str) -> Any:
        if key not in spec:
            raise ValueError(f"{path}.{key}: missing (a {spec.get('type')} grader needs it)")
        if not isinstance(spec[key], kind):
            raise ValueError(f"{path}.{key}: expected {kind.__name__}, got {spec[key]!r:.80}")
        return spec[key]

    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a grader object, got {spec!r:.80}")
    kind = spec.get("type")
    if kind == "string_check":
        operation = need("operation")
        if operation not in STRING_OPERATIONS:
            raise ValueError(f"{path}.operation: {operation!r} is not one of {', '.join(STRING_OPERATIONS)}")
        return StringCheck(_template(spec, "input", path), _template(spec, "reference", path), operation)
    if kind == "text_similarity":
        metric = need("evaluation_metric")
        if metric not in SIMILARITY_METRICS:
            raise ValueError(f"{path}.evaluation_metric: {metric!r} is not one of {', '.join(SIMILARITY_METRICS)}")
        threshold = spec.get("pass_threshold")
        if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"{path}.pass_threshold: expected a number, got {threshold!r}")
        embedding_model = spec.get("embedding_model")
        if metric == "cosine" and not embedding_model:
            raise ValueError(f"{path}.embedding_model: cosine similarity needs a local Hugging Face model path")
        try:
            return TextSimilarity(
                _template(spec, "input", path), _template(spec, "reference", path), metric, threshold, embedding_model
            )
        except (ImportError, LookupError, OSError) as exc:
            raise ValueError(f"{path}.evaluation_metric: {metric} is unavailable here: {exc}") from None
    if kind == "python":
        source = need("source")
        try:
            check_source(source, limits)
        except ValueError as exc:
            raise ValueError(f"{path}.source: {exc}") from None
        unavailable = namespaces_unavailable() if limits.mode == "namespaces" else None
        if unavailable:
            raise ValueError(
                f"graders.sandbox: python graders run in the namespace sandbox, which cannot start on this host "
                f"({unavailable}); set graders.sandbox: audit_hook_only to run them with the weaker audit-hook-only "
                "sandbox (no OS boundary)"
            )
        return PythonGrader(source, limits)
    if kind == "multi":
        graders = need("graders", dict)
        if not graders:
            raise ValueError(f"{path}.graders: a multi grader needs at least one grader")
        children = {
            name: parse_spec(child, limits, f"{path}.graders.{name}", endpoint, api_key, concurrency)
            for name, child in graders.items()
        }
        try:
            expression = compile_expression(need("calculate_output"), set(children))
        except ExpressionError as exc:
            raise ValueError(f"{path}.calculate_output: {exc}") from None
        return Multi(children, expression)
    if kind in ("score_model", "label_model"):
        return _model_grader(spec, kind, path, endpoint, api_key, limits.wall_timeout_s, concurrency)
    raise ValueError(f"{path}.type: {kind!r} is not a grader type (supported: {', '.join(SUPPORTED_TYPES)})")


def _template(spec: dict, key: str, path: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{path}.{key}: expected a template string such as '{{{{sample.output_text}}}}', got {value!r}")
    for match in _TEMPLATE.finditer(value):
        if match.group(1).split(".")[0] not in ("item", "sample"):
            raise ValueError(f"{path}.{key}: template {match.group(0)} must start with item. or sample.")
    return value


def _per_sample(fn, sample: dict, item: dict) -> float | GraderFailure:
    try:
        return float(fn(sample, item))
    except Exception as exc:  # a template naming a missing field, a metric failing on odd text: this sample only
        return GraderFailure(f"{type(exc).__name__}: {exc}"[:500])


def _similarity_function(metric: str, embedding_model: str | None):
    """``(text, reference) -> similarity`` for a metric, its library imported (and its data checked) now."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return lambda text, ref: fuzz.ratio(text, ref) / 100.0
    if metric == "bleu":
        import sacrebleu

        return lambda text, ref: sacrebleu.sentence_bleu(text, [ref]).score / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return lambda text, ref: sentence_gleu([ref.split()], text.split())
    if metric == "meteor":
        import nltk
        from nltk.translate.meteor_score import meteor_score

        nltk.data.find("corpora/wordnet")  # LookupError without the data; nothing is downloaded here
        return lambda text, ref: meteor_score([ref.split()], text.split())
    if metric.startswith("rouge_"):
        from rouge_score import rouge_scorer

        kind = "rougeL" if metric == "rouge_l" else "rouge" + metric[-1]
        scorer = rouge_scorer.RougeScorer([kind])
        return lambda text, ref: scorer.score(ref, text)[kind].fmeasure
    return _CosineEmbedder(embedding_model)


class _CosineEmbedder:
    """Cosine similarity of mean-pooled last hidden states of a local Hugging Face model."""

    def __init__(self, model_path: str):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).eval()

    def embed(self, text: str):
        with self._torch.no_grad():
            ids = self.tokenizer(text or " ", return_tensors="pt", truncation=True, max_length=512)
            hidden = self.model(**ids).last_hidden_state[0]
        return hidden.mean(dim=0)

    def __call__(self, text: str, reference: str) -> float:
        a, b = self.embed(text), self.embed(reference)
        return float(self._torch.nn.functional.cosine_similarity(a, b, dim=0))


def _model_grader(
    spec: dict, kind: str, path: str, endpoint: str, api_key: str, timeout_s: float, concurrency: int
) -> ModelGrader:
    if not endpoint:
        raise ValueError(f"{path}.endpoint: a {kind} grader needs the grader item's endpoint, the base URL of an "
                         "OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1 of a vLLM server)")
    model = spec.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{path}.model: missing (the model name the endpoint serves)")
    messages = spec.get("input")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError(f"{path}.input: expected a list of chat messages with role and content strings")
    for k, message in enumerate(messages):
        _template(message, "content", f"{path}.input[{k}]")
    params = dict(spec.get("sampling_params") or {})
    unknown = set(params) - {"temperature", "top_p", "seed", "max_completions_tokens"}
    if unknown:
        raise ValueError(f"{path}.sampling_params: unknown keys {sorted(unknown)}")
    if "max_completions_tokens" in params:
        params["max_tokens"] = params.pop("max_completions_tokens")
    score_range: tuple[float, float] = (0.0, 1.0)
    labels: list[str] = []
    passing: list[str] = []
    if kind == "score_model":
        bounds = spec.get("range", [0, 1])
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
                and bounds[0] < bounds[1]):
            raise ValueError(f"{path}.range: expected [low, high] with low < high, got {bounds!r}")
        score_range = (float(bounds[0]), float(bounds[1]))
    else:
        labels, passing = spec.get("labels"), spec.get("passing_labels")
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise ValueError(f"{path}.labels: expected a non-empty list of strings")
        if not (isinstance(passing, list) and passing and set(passing) <= set(labels)):
            raise ValueError(f"{path}.passing_labels: expected a non-empty subset of labels {labels}")
    return ModelGrader(
        kind, model, messages, endpoint, api_key, params, score_range, labels, passing, timeout_s, concurrency
    )
