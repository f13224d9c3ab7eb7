"""The one exception type a user sees: the CLI prints its message as one line, no traceback."""


class HybridInferError(Exception):
    """A user-facing error (bad model folder, bad flag, bad prompt): the message says what to do."""
