"""The one exception the data layer raises for unusable files and folders."""

from __future__ import annotations


class DataError(ValueError):
    """A data file or folder is missing, corrupt or not what it claims to be.

    The message is one line: it names the file or folder and says what to do. The CLI prints it
    and exits non-zero, so it must read well without a traceback.
    """
