"""Errors a user can act on. The CLI prints them as one line (exit 2); the gateway maps them to HTTP 4xx."""


class SpecrelayError(Exception):
    """Base of every user-facing error: the message says what is wrong and where."""


class ModelLoadError(SpecrelayError):
    """A model directory cannot be loaded: missing or corrupt file, unsupported architecture, shape mismatch."""


class ConfigError(SpecrelayError):
    """An invalid setting (CLI flag, environment variable, config file)."""
