"""Savepoint: a USB disk with SAVE and RESTORE."""

from importlib import metadata

try:  # the installed distribution's version, so --version says what pip installed
    __version__ = metadata.version("savepoint")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown (not installed)"
