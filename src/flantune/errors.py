"""The error a run stops with, below every module that raises it (run, checkpoint, packing, the commands).

`flantune.run` re-exports it: commands and tests name it `flantune.run.TrainingError`.
"""


class TrainingError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do."""
