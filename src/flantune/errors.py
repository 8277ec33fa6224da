"""The errors a user can fix, in one light module: the one a run stops with (run, checkpoint,
packing, the commands), a bad value of an environment variable flantune reads, and each command's
own (data, models, methods, export, generate, rewards). The CLI catches them all without importing
the modules that raise them (torch, transformers, rouge and the rest load only where a command
needs them); those modules re-export theirs (`flantune.data.DataError`, `flantune.run.TrainingError`).
"""


class TrainingError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do."""


class SettingError(ValueError):
    """An environment variable flantune reads holds a value it does not take; the message names the
    variable and the values it takes."""


class DataError(ValueError):
    """A data file, hub dataset or row cannot be used; the message names it and says what to do."""


class ExportError(ValueError):
    """The adapter cannot be merged; the message says why."""


class GenerateError(ValueError):
    """The model, adapter or input cannot be used; the message says which and what to do."""


class MethodError(ValueError):
    """The method cannot be applied to this model or machine; the message says why and what to do."""


class ModelLoadError(RuntimeError):
    """The model or tokenizer named in the recipe cannot be loaded; the message says why and what to do."""


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not a number."""


class RunInterrupted(TrainingError):
    """SIGINT or SIGTERM stopped the run after a checkpoint; the message says how to continue."""


USER_ERRORS = (TrainingError, SettingError, DataError, ExportError, GenerateError, MethodError, ModelLoadError,
               RewardError)  # fmt: skip
"""What the CLI prints as one line (with its own UsageError, the recipe's ConfigError and TaskError)."""
