"""A real Azurite blob service (a Node.js subprocess on 127.0.0.1) for the Azure tests.

Azurite is the npm package ``azurite`` (v3), installed by ``scripts/test`` into
``.cache/azurite`` (Node.js from Debian when the machine has none). The fixture starts
its blob service on a free loopback port, in memory, without telemetry, and fails
(never skips) when it is not installed: the Azure backend must not go untested
silently.

For the whole session the environment holds Azurite's well-known account key
(``AZURE_STORAGE_KEY``; the other ``AZURE_STORAGE_*`` variables are unset), so storages
and ``vdistream`` subprocesses find their credentials the way a user's would. Other test
packages use it with ``from tests.azure.azurite import azurite  # noqa: F401`` in their
conftest; ``azurite.new_url()`` gives a fresh container and its ``azure://`` URL.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient

from tests.servers import environment, free_port
from vdistream.storage.azure.client import DEVELOPMENT_KEY
from vdistream.storage.azure.storage import AzureStorage

__all__ = ("ACCOUNT", "AZURITE", "Azurite", "azurite")

#: the npm package's blob service, where scripts/test installs it
AZURITE = Path(__file__).resolve().parents[2] / ".cache/azurite/node_modules/.bin/azurite-blob"
#: Azurite's built-in account (its key is ``DEVELOPMENT_KEY``)
ACCOUNT = "devstoreaccount1"

_ENV = {"AZURE_STORAGE_KEY": DEVELOPMENT_KEY}
_UNSET = ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ENDPOINT", "AZURE_STORAGE_SAS_TOKEN")


@dataclass
class Azurite:
    """The running service: its endpoint, and a synchronous client to look inside."""

    endpoint: str  # http://127.0.0.1:PORT/devstoreaccount1
    port: int
    service: BlobServiceClient
    account: str = ACCOUNT
    key: str = DEVELOPMENT_KEY
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};"
            f"AccountKey={self.key};BlobEndpoint={self.endpoint};"
        )

    def new_container(self) -> str:
        name = f"test-{os.getpid()}-{next(self._names)}"
        self.service.create_container(name)
        return name

    def url(self, container: str, prefix: str = "backups", *, endpoint: str | None = None) -> str:
        """The ``azure://`` URL of ``prefix`` in ``container`` (on this Azurite, or on
        ``endpoint``: a proxy in front of it)."""
        where = endpoint or self.endpoint
        path = f"{container}/{prefix}" if prefix else container
        return f"azure://{self.account}/{path}?endpoint={where}"

    def new_url(self, prefix: str = "backups") -> str:
        """A fresh container and the ``azure://`` URL of ``prefix`` in it."""
        return self.url(self.new_container(), prefix)

    def storage(self, container: str, prefix: str = "backups", **options: Any) -> AzureStorage:
        """An ``AzureStorage`` on ``container`` (credentials from the environment)."""
        options.setdefault("endpoint", self.endpoint)
        return AzureStorage(self.account, container, prefix, **options)

    def blobs(self, container: str, prefix: str = "", *, uncommitted: bool = False) -> list[str]:
        """Blob names under ``prefix``; with ``uncommitted`` only the blobs holding
        nothing but uncommitted blocks (what a staged, never committed stream leaves)."""
        client = self.service.get_container_client(container)
        if not uncommitted:
            return sorted(blob.name for blob in client.list_blobs(name_starts_with=prefix))
        listed = client.list_blobs(name_starts_with=prefix, include=["uncommittedblobs"])
        return sorted(blob.name for blob in listed if self._only_blocks(container, blob.name))

    def _only_blocks(self, container: str, name: str) -> bool:
        """Uncommitted blocks and no committed data (a blob committed or deleted while
        the listing ran, a probe say, is neither)."""
        try:
            committed, uncommitted = self.service.get_blob_client(container, name).get_block_list(
                "all"
            )
        except ResourceNotFoundError:
            return False
        return bool(uncommitted) and not committed

    def get(self, container: str, name: str) -> bytes:
        return self.service.get_blob_client(container, name).download_blob().readall()

    def residue(self, storage: AzureStorage) -> list[str]:
        """Everything under the storage's prefix: committed blobs (relative names) and
        blobs of uncommitted blocks (``<uncommitted KEY>``)."""
        root = f"{storage.prefix}/" if storage.prefix else ""
        held = [name[len(root) :] for name in self.blobs(storage.container, root)]
        held += [
            f"<uncommitted {name[len(root) :]}>"
            for name in self.blobs(storage.container, root, uncommitted=True)
        ]
        return held


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """Azurite's blob service for the session (see the module docstring)."""
    if not AZURITE.exists() or shutil.which("node") is None:
        pytest.fail(
            f"the Azure tests need Azurite ({AZURITE.relative_to(AZURITE.parents[3])}) and "
            "Node.js: run scripts/test, which installs both (apt-get install nodejs npm; "
            "npm install --prefix .cache/azurite azurite@3)",
            pytrace=False,
        )
    with environment(_ENV, _UNSET), tempfile.TemporaryDirectory(prefix="azurite-") as workspace:
        yield from _run_azurite(Path(workspace))


def _run_azurite(workspace: Path) -> Iterator[Azurite]:
    """Start Azurite's blob service on a free loopback port (a few tries: another
    process may take the port first), wait until it accepts connections, yield it,
    stop it."""
    with open(workspace / "azurite.log", "w+b") as log:
        for _ in range(3):
            port = free_port()
            process = _start(port, workspace, log)
            try:
                if _wait_listening(process, port, log):
                    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
                    service = BlobServiceClient(
                        endpoint,
                        credential={"account_name": ACCOUNT, "account_key": DEVELOPMENT_KEY},
                    )
                    with contextlib.closing(service):
                        yield Azurite(endpoint, port, service)
                    return
            finally:
                _stop(process)
        log.seek(0)
        pytest.fail(
            "Azurite did not start:\n" + log.read().decode(errors="replace")[-3000:],
            pytrace=False,
        )


def _start(port: int, workspace: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(AZURITE),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--extentMemoryLimit",
            "1024",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--silent",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=workspace,
    )


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: IO[bytes]) -> bool:
    """True once the port accepts connections; False if the process exited (a port
    taken meanwhile); fails the session after 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.1)
    log.seek(0)
    pytest.fail(
        "Azurite did not listen within 30 s:\n" + log.read().decode(errors="replace")[-3000:],
        pytrace=False,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
