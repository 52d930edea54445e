"""Errors of the store. Every message says what happened and what to do about it."""


class StoreError(Exception):
    """Base of every store error."""


class NotAStoreError(StoreError):
    pass


class FormatVersionError(StoreError):
    pass


class CorruptStoreError(StoreError):
    pass


class OutOfRangeError(StoreError):
    pass


class StoreIOError(StoreError):
    pass


class StoreFullError(StoreIOError):
    """A data write found no space on the backing storage (ENOSPC / EDQUOT)."""
