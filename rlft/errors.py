"""Errors that name what is wrong, shared by every module (kept free of imports so any module can use them)."""


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted path of the offending field."""
