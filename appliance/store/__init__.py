"""The store: the two-copy VSM engine, its on-disk format (docs/format.md), init, check
and the offline CLI commands. `Store`, `create_store` and the errors are importable from here.
"""

from appliance.store.core import (
    CorruptStoreError,
    FormatVersionError,
    InitError,
    NotAStoreError,
    OutOfRangeError,
    Store,
    StoreError,
    StoreFullError,
    StoreIOError,
    create_store,
)

__all__ = [
    "Store",
    "create_store",
    "InitError",
    "StoreError",
    "NotAStoreError",
    "FormatVersionError",
    "CorruptStoreError",
    "OutOfRangeError",
    "StoreIOError",
    "StoreFullError",
]
