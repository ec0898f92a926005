"""Errors that end a run with a one-paragraph message instead of a traceback.

`UserError` is a problem with what the user asked for (config, data, combination);
`TrainingError` is a run that went wrong (divergence). Both are caught at the entry
points (launch.py, the worker) and printed without a stack trace.
"""


class UserError(Exception):
    """Bad input: names the bad value and what would be accepted."""


class TrainingError(Exception):
    """The run itself failed (e.g. a non-finite loss); checkpoints stay loadable."""
