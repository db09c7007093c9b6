"""The error type of user-facing input problems, shared by every layer of moedd.

It lives in a module of its own, below everything else, so that the data, network and config
modules can all raise it without importing each other.
"""


class ConfigError(ValueError):
    """A user-facing configuration or input problem; its message is one line."""
