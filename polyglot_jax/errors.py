"""Errors that the CLI reports as one line on stderr with exit code 2 (bad usage, config or input)."""


class PolyglotError(Exception):
    """Base class: the message is a complete sentence naming the offending field, file or shape."""


class ConfigError(PolyglotError):
    """A config field (or a combination of fields) that cannot work; raised before any compile."""


class InputError(PolyglotError):
    """A missing, unreadable or malformed input file or directory."""
