"""Configuration of environments (multi-turn rollouts): every default of the environment role lives here.

A leaf: imports no Ray, torch or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlft.errors import ConfigError


@dataclass
class EnvConfig:
    # ``module:Class`` of an ``rlft.envs.Environment`` subclass (the module importable where the job runs, e.g. a
    # file beside the config). Empty: single-turn rollouts, one prompt → one response.
    name: str = ""
    # Or ``module:function``: an agent program that drives each trajectory itself through an OpenAI-compatible
    # endpoint of the rollout worker, called as ``function(item, base_url, api_key)`` in a thread of its own; it
    # may return a reward. Its calls, recorded token-in/token-out, become the sample (``rlft/rollout/endpoint.py``).
    agent: str = ""
    # Keyword arguments of the class's constructor, the same for every trajectory.
    kwargs: dict = field(default_factory=dict)
    # The policy speaks at most this many times in one trajectory.
    max_turns: int = 4
    # Prompt + every turn + every observation, in tokens; 0: ``rollout.max_model_len``.
    max_total_tokens: int = 0
    # The longest one ``reset`` or ``step`` may take; past it the trajectory ends, counted as a timeout.
    step_timeout_s: float = 10.0
    # Environment workers (Ray actors); 0 runs the environments inside the rollout worker's process (debugging).
    num_workers: int = 1
    num_cpus_per_worker: float = 0.25


def multi_turn(cfg: EnvConfig) -> bool:
    """Whether rollouts are trajectories: an environment or an agent program is configured."""
    return bool(cfg.name or cfg.agent)


def validate_env_config(cfg: EnvConfig, max_model_len: int) -> None:
    """Reject what cannot run, naming the field; the class itself is imported later, where it runs."""

    def check(ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"envs.{name}: {why}")

    if cfg.name and cfg.agent:
        raise ConfigError(f"envs.agent: set envs.name (an environment) or envs.agent (an agent program), not both; "
                          f"got {cfg.name!r} and {cfg.agent!r}")
    if not (cfg.name or cfg.agent):
        return
    field_name, what = ("name", "module:Class") if cfg.name else ("agent", "module:function")
    module, _, attr = (cfg.name or cfg.agent).partition(":")
    check(bool(module) and bool(attr) and all(p.isidentifier() for p in module.split(".")) and attr.isidentifier(),
          field_name, f"expected '{what}' (an import path), got {cfg.name or cfg.agent!r}")
    check(cfg.max_turns >= 1, "max_turns", f"must be at least 1, got {cfg.max_turns}")
    check(cfg.max_total_tokens >= 0, "max_total_tokens", f"must be >= 0, got {cfg.max_total_tokens}")
    check(cfg.max_total_tokens <= max_model_len, "max_total_tokens",
          f"{cfg.max_total_tokens} does not fit rollout.max_model_len = {max_model_len}")
    check(cfg.step_timeout_s > 0, "step_timeout_s", f"must be > 0, got {cfg.step_timeout_s}")
    check(cfg.num_workers >= 0, "num_workers", f"must be >= 0, got {cfg.num_workers}")
    check(cfg.num_cpus_per_worker > 0, "num_cpus_per_worker", f"must be > 0, got {cfg.num_cpus_per_worker}")
    check(all(isinstance(k, str) for k in cfg.kwargs), "kwargs", "keys must be strings")
