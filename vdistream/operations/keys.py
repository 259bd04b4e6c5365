"""Where a backup's encryption key comes from, and the key a restore or verify needs.

``KeySource`` is what the user gave (a key file, an environment variable holding the
key or a passphrase); ``backup_key`` loads the key a new backup is encrypted with;
``pipeline_for`` rebuilds a stored backup's stages with its key, checked against what
the manifest recorded, so a wrong or missing key is reported before any byte is read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from vdistream.catalog import Manifest
from vdistream.errors import KeyMissingError, KeyNotNeededError
from vdistream.pipeline.chain import PipelineConfig

if TYPE_CHECKING:  # encryption is imported when used (start-up)
    from vdistream.pipeline.keys import Key

__all__ = ("KeySource", "backup_key", "pipeline_for")


@dataclasses.dataclass(frozen=True)
class KeySource:
    """Where the encryption key comes from: a key file, an environment variable holding
    the key, or one holding a passphrase (stretched with scrypt; the salt and
    parameters are recorded in the manifest so a restore derives the same key)."""

    key_file: str | None = None
    env: str | None = None
    passphrase_env: str | None = None
    #: a key configured for every job (the daemon's), used only when a backup is
    #: encrypted; a key given for one job (False) is refused for an unencrypted backup
    optional: bool = False

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.key_file, self.env, self.passphrase_env))

    @property
    def option(self) -> str:
        """How the user gave the key, as the command line spells it."""
        if self.key_file is not None:
            return "--encrypt-key-file"
        if self.env is not None:
            return "--encrypt-key-env"
        return "--encrypt-passphrase-env"

    async def load(self, kdf: dict[str, Any] | None = None) -> Key:
        passphrase = None
        from vdistream.pipeline.keys import ScryptParams, load_key

        if self.passphrase_env is not None:
            passphrase = os.environ.get(self.passphrase_env)
            if passphrase is None:
                raise KeyMissingError(
                    f"the environment variable {self.passphrase_env} holds no passphrase"
                )
        params = ScryptParams.from_dict(kdf) if kdf and passphrase is not None else None
        # scrypt takes a noticeable fraction of a second: keep it off the event loop
        return await anyio.to_thread.run_sync(
            lambda: load_key(
                key_file=self.key_file, env=self.env, passphrase=passphrase, kdf=params
            )
        )


async def backup_key(keys: KeySource | None) -> Key | None:
    """The key a new backup is encrypted with (None: not encrypted)."""
    if keys is None or not keys.given:
        return None
    return await keys.load()


async def pipeline_for(manifest: Manifest, keys: KeySource | None) -> PipelineConfig:
    """The manifest's stages, with the key loaded and checked against its fingerprint:
    a wrong or missing key is reported as such before any byte is read."""
    encryption = (manifest.pipeline or {}).get("encryption")
    key = None
    if not encryption and keys is not None and keys.given and not keys.optional:
        raise KeyNotNeededError(
            f"backup {manifest.backup_id} is not encrypted: leave out {keys.option}"
        )
    if encryption:
        if keys is None or not keys.given:
            raise KeyMissingError(
                f"backup {manifest.backup_id} is encrypted: give its key "
                "(--encrypt-key-file, --encrypt-key-env or --encrypt-passphrase-env)"
            )
        recorded = encryption.get("key", {})
        key = await keys.load(recorded.get("kdf"))
        key.check_fingerprint(str(recorded.get("fingerprint", "")), where=manifest.backup_id)
    return PipelineConfig.from_manifest(manifest.pipeline, key)
