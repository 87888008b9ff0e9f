"""Errors the CLI turns into one line (no traceback) and that importing costs nothing: no torch here."""


class ModelLoadError(ValueError):
    """A model folder or hub name that cannot be loaded; the message says which and what to give instead."""
