"""Environments for multi-turn, tool-using rollouts: the interface users implement, tool calls, where environments
run, and the token-in/token-out trajectory loop."""

from rlft.envs.base import Environment, StepResult, load_environment_class
from rlft.envs.config import EnvConfig, validate_env_config
from rlft.envs.tools import PythonEnvironment, ToolEnvironment, parse_tool_calls

__all__ = ["Environment", "EnvConfig", "PythonEnvironment", "StepResult", "ToolEnvironment", "load_environment_class",
           "parse_tool_calls", "validate_env_config"]
