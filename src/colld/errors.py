"""Errors the command line turns into a message instead of a traceback."""


class RunStoppedError(RuntimeError):
    """A run that stopped on purpose; the message names the cause and what to do."""
