"""Tool calls in the model's text, and an environment that runs them.

Models write tool calls in the Hermes / Qwen format, which their chat templates render and their SFT data teaches:

    <tool_call>{"name": "add", "arguments": {"a": 123, "b": 456}}</tool_call>

``parse_tool_calls`` turns a turn's text into OpenAI-format ``tool_calls`` (``arguments`` a JSON string, as the
OpenAI API gives them) and the text around them. A call whose JSON does not parse is kept with its raw text as
``arguments`` and marked ``"invalid": True``; ``ToolEnvironment`` answers it with an error the model can read.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

from rlft.envs.base import Environment, Message, StepResult

# What a code tool shows the model of its output, at most.
MAX_TOOL_OUTPUT_BYTES = 4096
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """The text without its tool calls (stripped), and the calls in OpenAI format, numbered ``call_0``, ..."""
    calls = []
    for i, match in enumerate(TOOL_CALL.finditer(text)):
        raw = match.group(1).strip()
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "", "arguments": raw}}
        try:
            body = json.loads(raw)
            name, arguments = body["name"], body.get("arguments", {})
            if not isinstance(name, str) or not isinstance(arguments, dict):
                raise TypeError("name must be a string and arguments an object")
            call["function"] = {"name": name, "arguments": json.dumps(arguments)}
        except (ValueError, KeyError, TypeError):
            call["invalid"] = True
        calls.append(call)
    return TOOL_CALL.sub("", text).strip(), calls


class ToolEnvironment(Environment):
    """Runs each turn's tool calls with ``self.tools`` (name → function of the call's arguments) and shows the
    results as ``tool`` messages; a turn without tool calls is the final answer and ends the trajectory.

    Functions run in the environment's process: a tool that executes code should run it through
    ``rlft.sandbox.run_python``, which an OS boundary confines."""

    tools: dict[str, Callable[..., Any]] = {}

    def step(self, action: Message) -> StepResult:
        calls = action.get("tool_calls") or []
        if not calls:
            return StepResult(done=True)
        return StepResult([self._run(call) for call in calls])

    def _run(self, call: dict) -> Message:
        name = call["function"]["name"]
        if call.get("invalid"):
            result = "error: a tool call must be JSON like {\"name\": ..., \"arguments\": {...}}"
        elif name not in self.tools:
            result = f"error: unknown tool {name!r}; tools: {', '.join(sorted(self.tools))}"
        else:
            try:
                result = self.tools[name](**json.loads(call["function"]["arguments"]))
            except Exception as err:  # noqa: BLE001 - the model reads the error and may do better
                result = f"error: {type(err).__name__}: {err}"
        return {"role": "tool", "tool_call_id": call["id"], "name": name, "content": str(result)}


class PythonEnvironment(ToolEnvironment):
    """A ``python`` tool (``{"code": "..."}``) that runs the model's code in rlft's OS sandbox (``rlft.sandbox``: no
    network, no file outside its own scratch directory, limits on memory, CPU and time) and answers with what the
    code printed, and with why it stopped when it failed. Subclass it to add tools or a reward; ``envs.kwargs`` set
    the limits and ``sandbox: audit_hook_only`` where user namespaces are unavailable (a weaker boundary)."""

    def __init__(self, timeout_s: float = 5.0, memory_mib: int = 512, sandbox: str = "namespaces"):
        from rlft.sandbox import SandboxLimits

        self.limits = SandboxLimits(wall_timeout_s=timeout_s, cpu_seconds=max(1, math.ceil(timeout_s)),
                                    memory_mib=memory_mib, max_output_bytes=MAX_TOOL_OUTPUT_BYTES)
        self.sandbox = sandbox
        self.tools = {**self.tools, "python": self.python}

    def python(self, code: str) -> str:
        from rlft.sandbox import run_python

        if not isinstance(code, str):
            raise TypeError(f"code must be a string, got {type(code).__name__}")
        done = run_python(code, b"", self.limits, self.sandbox)
        out = done.stdout.decode(errors="replace")
        if done.stdout_dropped:
            out += f"\n[{done.stdout_dropped} more bytes not shown]"
        if done.ended:
            out += f"\n[{done.ended}]\n" + done.stderr.decode(errors="replace")[-MAX_TOOL_OUTPUT_BYTES // 4:]
        return out
