"""The errors below every module that raises them: the one a run stops with (run, checkpoint,
packing, the commands) and a bad value of an environment variable flantune reads.

`flantune.run` re-exports TrainingError: commands and tests name it `flantune.run.TrainingError`.
"""


class TrainingError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do."""


class SettingError(ValueError):
    """An environment variable flantune reads holds a value it does not take; the message names the
    variable and the values it takes."""
