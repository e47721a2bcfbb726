"""Exceptions that carry the failing value and what to do about it.

Each error renders as one line, ``<what failed>: <value>. <what to do>``, which the
command-line tools print without a stack trace unless ``--debug`` is given. The
exit code identifies the kind of failure for a batch runner.
"""

from __future__ import annotations


class HistometError(Exception):
    """Base class: a failure that the user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}. {self.hint[0].upper()}{self.hint[1:]}"
        return self.message


class InputError(HistometError):
    """The input slide or an argument is invalid."""

    exit_code = 3


class SlideNotFoundError(InputError):
    """The slide path does not exist."""


class SlideOpenError(InputError):
    """No reader could open the file as a slide."""


class SlideReadError(InputError):
    """The slide opened, but its pixel data could not be decoded."""


class UsageError(HistometError):
    """A command-line value is invalid; found before any work starts."""

    exit_code = 2


class UnsupportedImageError(InputError):
    """The slide opens but its pixel format is not 8-bit RGB brightfield."""


class MissingMppError(InputError):
    """The slide's microns per pixel are unknown or implausible."""


class NoTissueError(HistometError):
    """The tissue mask or the tile grid is empty, so nothing can be predicted."""

    exit_code = 5


class ServerError(HistometError):
    """The inference server is unreachable, not ready, or failed a request."""

    exit_code = 4


class ServerUnavailableError(ServerError):
    """The server cannot be reached or is not ready."""


class ModelConfigError(ServerError):
    """The served model's configuration is missing a value the client needs."""


class InferenceError(ServerError):
    """A request in the slide's sequence failed on the server."""


class ExportError(HistometError):
    """Export or repository writing failed."""
