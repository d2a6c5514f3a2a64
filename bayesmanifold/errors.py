"""The one exception family of bayesmanifold.

Every error caused by user input is a :class:`BayesManifoldError` (or a subclass) whose message
names what was wrong and what is accepted. The command line prints such an error as one line on
stderr and exits non-zero.
"""

__all__ = [
    "BayesManifoldError",
    "ModelError",
    "SelectionError",
    "InputError",
    "ObjectiveError",
    "CheckpointError",
    "TaskError",
    "ConfigError",
]


class BayesManifoldError(ValueError):
    """Base class of every error bayesmanifold raises for bad input."""


class ModelError(BayesManifoldError):
    """The model is not one bayesmanifold can attach to (type, hook points, dtype, directory)."""


class SelectionError(BayesManifoldError):
    """A layer, head, position or hook name that the model does not have."""


class InputError(BayesManifoldError):
    """Tokens, masks, groups or arrays of the wrong shape, range or content."""


class ObjectiveError(BayesManifoldError):
    """An objective that is not a finite scalar with a gradient path to the attention heads."""


class CheckpointError(BayesManifoldError):
    """A checkpoint directory that is missing, partial, or from another task."""


class TaskError(BayesManifoldError):
    """Impossible wind-tunnel parameters, or a model that does not fit the task."""


class ConfigError(BayesManifoldError):
    """A configuration value outside its accepted range."""
