"""Errors a person can act on: the CLI prints their message as one line, without a stack trace."""


class EfficiaError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(EfficiaError):
    pass


class DataError(EfficiaError):
    pass


class TokenizerError(EfficiaError):
    pass


class CheckpointError(EfficiaError):
    pass
