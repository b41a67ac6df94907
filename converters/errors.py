"""Errors the converters raise; each message names the file, UID or position at fault."""


class ConversionError(ValueError):
    """Base class: input that cannot be converted faithfully."""


class SeriesError(ConversionError):
    """A DICOM folder that is not one clean, complete, untilted series."""


class SeriesIncompleteError(SeriesError):
    """Slices missing or unevenly spaced along the slice normal."""


class RTStructError(ConversionError):
    """An RTSTRUCT that cannot be read or does not belong to the given series."""
