"""``azure://account/container/prefix``: block blobs in an Azure Blob Storage container
(or Azurite), on the SDK's async client (``azure-storage-blob``, ``aio``).

URL form and credentials (``client``): ``azure://ACCOUNT/CONTAINER[/PREFIX]
[?endpoint=URL]``; the credentials come from the environment, the first that is set:
``AZURE_STORAGE_CONNECTION_STRING``, ``AZURE_STORAGE_KEY`` (the key of the URL's
account), ``AZURE_STORAGE_SAS_TOKEN``. The endpoint is ``?endpoint=``, else
``AZURE_STORAGE_ENDPOINT``, else the connection string's ``BlobEndpoint``, else
``https://ACCOUNT.blob.core.windows.net``. Azurite on its default port::

    export AZURE_STORAGE_CONNECTION_STRING='UseDevelopmentStorage=true'
    vdistream backup sqlite:///db.sqlite azure://devstoreaccount1/backups/db1

(elsewhere: ``?endpoint=http://HOST:PORT/devstoreaccount1`` and ``AZURE_STORAGE_KEY``
set to Azurite's well-known account key).

Modules: ``client`` (URL, credentials, client, retries), ``errors`` (translation),
``blocks`` (block sizes and ids), ``storage`` (operations, owner marks, uncommitted
blocks), ``sink`` (staged blocks, committed at ``commit`` only, never over an existing
blob), ``source`` (ranged reads with read-ahead). The task groups are S3's
(``vdistream.storage.s3.tasks``), and retries are told to the same hook
(``vdistream.storage.s3.observe_retries``). Every name here loads the Azure SDK, so they
are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vdistream.storage.azure.blocks import (
        BLOCK_GROWTH_INTERVAL,
        DEFAULT_BLOCK_SIZE,
        MAX_BLOCK_SIZE,
        MAX_BLOCKS,
        block_size_for,
        initial_block_size,
        stream_capacity,
    )
    from vdistream.storage.azure.errors import is_ambiguous, translate_azure_error
    from vdistream.storage.azure.sink import AzureSink
    from vdistream.storage.azure.source import AzureSource
    from vdistream.storage.azure.storage import MARK_NAME, AzureObject, AzureStorage, AzureUpload

__all__ = (
    "BLOCK_GROWTH_INTERVAL",
    "DEFAULT_BLOCK_SIZE",
    "MARK_NAME",
    "MAX_BLOCKS",
    "MAX_BLOCK_SIZE",
    "AzureObject",
    "AzureSink",
    "AzureSource",
    "AzureStorage",
    "AzureUpload",
    "block_size_for",
    "initial_block_size",
    "is_ambiguous",
    "stream_capacity",
    "translate_azure_error",
)


def __getattr__(name: str) -> Any:
    if name in __all__:  # from the module that defines it (each loads the Azure SDK)
        for module in ("blocks", "errors", "sink", "source", "storage"):
            if name in (found := vars(importlib.import_module(f"{__name__}.{module}"))):
                return found[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
