"""User-facing errors.

Every problem caused by the user's input (a bad flag, a missing file, a corrupt checkpoint) is raised as
:class:`MsrnnError` with one line that names the problem and the fix. The CLI prints that line and exits
non-zero without a traceback; library users can catch it like any exception.
"""

from __future__ import annotations


class MsrnnError(Exception):
    """A problem with the user's input, explained in one line (problem, then fix)."""


class ConfigError(MsrnnError, ValueError):
    """A configuration value is invalid."""


class DataError(MsrnnError):
    """A corpus, data spec or token stream cannot be used."""


class ModelLoadError(MsrnnError):
    """A model or checkpoint directory cannot be loaded."""
