"""What a user's environment implements: ``reset`` a trajectory from a data row, then ``step`` on each of the
policy's turns.

    class Guess(Environment):
        def reset(self, item):                      # the data row: messages, answer, any extra fields
            self.secret = int(item["answer"])
            return item["messages"]                 # the conversation the policy sees first
        def step(self, action):                     # the policy's turn: {"role": "assistant", "content", ...}
            guess = int(action["content"])
            if guess == self.secret:
                return StepResult([], reward=1.0, done=True)
            hint = "higher" if guess < self.secret else "lower"
            return StepResult([{"role": "user", "content": hint}])

One object per trajectory, used by one thread at a time. ``reset`` and ``step`` may be ``async def`` instead: the
coroutines of all trajectories then run on one event loop, for environments that wait on I/O. ``action["tool_calls"]`` holds the tool calls parsed from
the turn's text in OpenAI format (``ToolEnvironment`` runs them). Rewards returned by ``step`` add up to the
trajectory's environment reward; the configured graders then score the final transcript as they score a
single-turn response.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from rlft.errors import ConfigError

Message = dict


@dataclass
class StepResult:
    # Appended to the conversation after the policy's turn (tool results, a user's reply); empty is allowed.
    messages: list[Message] = field(default_factory=list)
    reward: float = 0.0
    # True ends the trajectory after this turn; so do ``envs.max_turns`` and ``envs.max_total_tokens``.
    done: bool = False


class Environment:
    """Subclass and override ``step`` (and ``reset`` to do more than show the row's messages)."""

    def reset(self, item: dict) -> list[Message]:
        return list(item["messages"])

    def step(self, action: Message) -> StepResult:
        raise NotImplementedError(f"{type(self).__name__}.step")


def load_environment_class(name: str) -> type[Environment]:
    """The class ``module:Class`` names; a ``ConfigError`` naming ``envs.name`` when it cannot be imported."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the config's problem
        raise ConfigError(f"envs.name: cannot import module {module_name!r}: {type(err).__name__}: {err}") from err
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ConfigError(f"envs.name: {name!r} is not an rlft.envs.Environment subclass (got {cls!r})")
    return cls


def load_agent_function(path: str):
    """The function ``module:function`` names (``envs.agent``); a ``ConfigError`` naming the field otherwise."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"envs.agent: cannot import module {module_name!r}: {type(err).__name__}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"envs.agent: {path!r} is not a function (got {fn!r})")
    return fn
