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


class TrainingError(EfficiaError):
    """The run itself went wrong (a non-finite loss): the message names the step and the last good checkpoint."""


class Stopped(EfficiaError):
    """A signal stopped the run after saving; the CLI exits 128 + the signal number, as a shell would."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
