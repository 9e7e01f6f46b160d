"""The error every checkpoint problem raises (bad source, config, weights or hub access)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the problem."""
