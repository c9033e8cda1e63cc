"""One error hierarchy for the whole library, and its one warning category.

Every error a user can trigger with bad input is a :class:`SomaError`; the CLI turns it into a
one-line message and a non-zero exit code. Anything else is a bug and keeps its traceback.
Something a user should know but that does not stop the run is a :class:`SomaWarning`, raised with
:func:`warnings.warn` (the library never prints); the CLI shows it as one line.
"""

from __future__ import annotations

import re

#: rasterio's pointer to an exception it chained, which says nothing once quoted in a one-line message
_RASTERIO_POINTER = re.compile(r"[\s:]*\(?Read failed\. See previous exception for details\.\)?")


class SomaError(Exception):
    """Base class of every expected, user-facing error."""

    exit_code = 2

    def __str__(self) -> str:
        return _RASTERIO_POINTER.sub("", super().__str__())


class SomaWarning(UserWarning):
    """Base class of the library's user-facing warnings."""


class InputError(SomaError):
    """An input file is missing, unreadable, or not a usable raster."""


class GeoreferenceError(InputError):
    """Inputs lack a CRS/transform, or do not overlap."""


class BandError(InputError):
    """The band selection does not fit the raster."""


class DataError(SomaError):
    """A dataset directory (evaluate/train) is malformed."""


class OutputError(SomaError):
    """The output cannot be written (exists without --overwrite, missing folder, ...)."""


class WeightsError(SomaError):
    """A weights file is missing, corrupt, or does not match its metadata."""


class ConfigError(SomaError):
    """An option value is invalid."""


class MatchError(SomaError):
    """Matching failed (for example no valid pixels in the overlap)."""


class RegistrationFailed(SomaError):
    """The verdict on a registration is ``failed`` and ``--strict`` was asked for.  The outputs are
    written (the moving image unmoved); ``result`` is the :class:`~soma_cli.pipeline.RegisterResult`."""

    exit_code = 3

    def __init__(self, message: str, result):
        super().__init__(message)
        self.result = result
