"""The embedded default: a locally built tokenizer and small Llama model, and synthetic tasks with verifiable answers.

``resolve("tiny://model")`` gives the cached model directory (built on first use, offline);
``resolve("tiny://arithmetic/test.jsonl")`` a task's data file.
"""

from rlft.tiny.build import build, resolve
from rlft.tiny.tasks import TASKS, check_answer, make_examples

__all__ = ["TASKS", "build", "check_answer", "make_examples", "resolve"]
