"""Errors the converters raise; each message names the file, UID or position at fault."""
from config.errors import UserError


class ConversionError(UserError):
    """Base class: input that cannot be converted faithfully."""


class SeriesError(ConversionError):
    """A DICOM folder that is not one clean, complete, untilted series."""


class SeriesIncompleteError(SeriesError):
    """Slices missing, duplicated or unevenly spaced along the slice normal (converters/contiguity.py).

    `missing_mm`: the missing positions along the normal, when slices are missing.
    """

    def __init__(self, message: str, missing_mm: list[float] | None = None) -> None:
        super().__init__(message)
        self.missing_mm = list(missing_mm or [])


class RTStructError(ConversionError):
    """An RTSTRUCT that cannot be read or does not belong to the given series."""
