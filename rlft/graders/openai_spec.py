"""Graders written in OpenAI's reinforcement fine-tuning grader JSON, run unchanged:

- ``string_check``: ``input`` vs ``reference`` with ``operation`` ``eq`` / ``ne`` / ``like`` (contains) / ``ilike``
  (contains, ignoring case) → 1.0 or 0.0;
- ``text_similarity``: ``evaluation_metric`` ``fuzzy_match`` (rapidfuzz), ``bleu`` (sacrebleu), ``gleu`` (nltk),
  ``meteor`` (nltk, needs its wordnet data), ``rouge_1`` .. ``rouge_5`` / ``rouge_l`` (rouge-score, F-measure) or
  ``cosine`` (mean-pooled hidden states of a local Hugging Face model, ``embedding_model``) → the similarity;
  ``pass_threshold`` is kept for reporting;
- ``python``: ``source`` defining ``grade(sample, item) -> float``, run in the sandbox (``rlft.graders.sandbox``);
- ``multi``: ``graders`` (name → grader) combined by ``calculate_output`` (``rlft.graders.expression``).

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
from rlft.graders.sandbox import SandboxError, SandboxLimits, check_source, run_sandboxed

STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
SIMILARITY_METRICS = (
    "fuzzy_match", "bleu", "gleu", "meteor", "cosine", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
)
SUPPORTED_TYPES = ("string_check", "text_similarity", "python", "multi")
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
    limits: SandboxLimits

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


def parse_spec(spec: dict, limits: SandboxLimits, path: str = "spec") -> SpecGrader:
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
        return PythonGrader(source, limits)
    if kind == "multi":
        graders = need("graders", dict)
        if not graders:
            raise ValueError(f"{path}.graders: a multi grader needs at least one grader")
        children = {name: parse_spec(child, limits, f"{path}.graders.{name}") for name, child in graders.items()}
        try:
            expression = compile_expression(need("calculate_output"), set(children))
        except ExpressionError as exc:
            raise ValueError(f"{path}.calculate_output: {exc}") from None
        return Multi(children, expression)
    if kind in ("score_model", "label_model"):
        raise ValueError(f"{path}.type: {kind} graders are not supported yet (supported: {', '.join(SUPPORTED_TYPES)})")
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
