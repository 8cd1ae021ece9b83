"""The trainer's two failures that end a command in one line: a setting it cannot take, a
dataset it cannot have. Plain classes, so the command line catches them without importing
torch."""


class ConfigError(ValueError):
    """A setting has a value it cannot take; the message names the key and what was expected."""


class DataError(RuntimeError):
    """The dataset cannot be had; the message says where it must be put (`trainer.data`)."""
