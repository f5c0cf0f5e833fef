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


class NumericsError(MsrnnError, ArithmeticError):
    """A loss, logit or metric is NaN or infinite, so there is no honest number to report."""


def one_line(exc: BaseException, limit: int = 400) -> str:
    """A library's exception as one line for a message: whitespace folded, and if it must be shortened, cut at a
    sentence end so the reader never gets half a sentence."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > 0 else text[:limit].rsplit(" ", 1)[0] + " ..."
