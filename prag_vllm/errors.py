"""User-facing errors: raised at the boundary, printed by the CLI as one line."""


class PragError(Exception):
    """Base class of errors that the CLI reports as one line and exit code 2."""


class InputError(PragError):
    """Bad user input: a missing or malformed file, an unknown mode, k <= 0, ..."""


class AdapterError(PragError):
    """An adapter file is missing, corrupt or does not fit the model."""


class RetrievalError(PragError):
    """A retrieval backend cannot be used: server unreachable, index missing or of the wrong shape."""
