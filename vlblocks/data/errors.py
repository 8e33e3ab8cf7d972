"""The one exception type for malformed or missing data."""

from __future__ import annotations


class DataError(ValueError):
    """A data file, archive member or record is missing or malformed.

    The message names where the problem is (file, zip member, line number, field) so that a
    bad record in a large dataset can be found without a debugger.
    """
