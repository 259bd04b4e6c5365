"""Where a backup's keys come from, the key a restore or verify needs, and rewrapping.

``KeySource`` is what the user gave for a backup, restore or verify: a key file, an
environment variable holding the key or a passphrase (one of them), X25519 public keys
to encrypt to (``recipients``) and an X25519 private key to decrypt with
(``identity_file``). ``backup_key`` makes a new backup's random data key, wrapped for
each key-encryption key given (``vdistream.pipeline.envelope``); ``pipeline_for``
rebuilds a stored backup's stages with its data key, unwrapped with what the user gave,
so a wrong or missing key is reported before any byte is read. Backups made before
envelopes (their streams encrypted with the key itself) still open with that key.

``rotate_keys``, ``add_keys`` and ``remove_keys`` rewrap the data key of every backup in
a destination (``KeyRef`` names a key for them): only the manifest's key block changes,
each manifest is replaced atomically (``catalog.store.replace_manifest``) under the
backup's in-progress mark, and a rerun after an interruption finishes the job (a backup
already done is reported as such). No stream is read or written. A backup still being
written when the command runs gets the keys its job was given, not these: one that
commits meanwhile is rewrapped too, one still running at the end is reported
(``RewrapReport.running``) and fails the command, so that nobody retires a key that
such a backup still needs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import anyio.to_thread

from vdistream.catalog import (
    MANIFEST_NAME,
    CatalogError,
    Manifest,
    list_manifests,
    read_manifest,
)
from vdistream.errors import (
    ConfigError,
    KeyMissingError,
    KeyNotNeededError,
    PipelineError,
    StorageError,
    WrongKeyError,
)
from vdistream.pipeline.chain import PipelineConfig

if TYPE_CHECKING:  # encryption is imported when used (start-up)
    from vdistream.pipeline.envelope import Envelope, Identity, Passphrase, Recipient, Wrap
    from vdistream.pipeline.keys import Key
    from vdistream.storage import Storage

__all__ = (
    "KeyRef",
    "KeySource",
    "RewrapReport",
    "add_keys",
    "backup_key",
    "list_keys",
    "pipeline_for",
    "remove_keys",
    "rotate_keys",
)

_GIVE_KEY = (
    "give its key (--encrypt-key-file, --encrypt-key-env or --encrypt-passphrase-env) "
    "or the private key of one of its recipients (--decrypt-identity)"
)


@dataclasses.dataclass(frozen=True)
class KeySource:
    """The keys of a job. A key file, an environment variable holding the key, or one
    holding a passphrase (stretched with scrypt; the salt and parameters are recorded in
    the manifest so a restore derives the same key): at most one of them. ``recipients``:
    X25519 public key files a new backup is also (or only) encrypted to; whoever holds
    a matching private key can open it, the writer need not. ``identity_file``: an X25519
    private key file that opens backups encrypted to its public key (restore, verify)."""

    key_file: str | None = None
    env: str | None = None
    passphrase_env: str | None = None
    #: a key configured for every job (the daemon's), used only when a backup is
    #: encrypted; a key given for one job (False) is refused for an unencrypted backup
    optional: bool = False
    recipients: tuple[str, ...] = ()
    identity_file: str | None = None

    @property
    def symmetric(self) -> bool:
        """Whether a key file, key variable or passphrase is given."""
        return any(v is not None for v in (self.key_file, self.env, self.passphrase_env))

    @property
    def given(self) -> bool:
        return self.symmetric or bool(self.recipients) or self.identity_file is not None

    @property
    def encrypts(self) -> bool:
        """Whether a new backup is encrypted with these keys (an identity only reads)."""
        return self.symmetric or bool(self.recipients)

    @property
    def option(self) -> str:
        """How the user gave the key, as the command line spells it."""
        if self.key_file is not None:
            return "--encrypt-key-file"
        if self.env is not None:
            return "--encrypt-key-env"
        if self.passphrase_env is not None:
            return "--encrypt-passphrase-env"
        if self.identity_file is not None:
            return "--decrypt-identity"
        return "--encrypt-recipient"

    def _passphrase(self) -> str | None:
        if self.passphrase_env is None:
            return None
        passphrase = os.environ.get(self.passphrase_env)
        if not passphrase:  # unset or empty: name the variable
            raise KeyMissingError(
                f"the environment variable {self.passphrase_env} holds no passphrase"
            )
        return passphrase

    async def load(self, kdf: dict[str, Any] | None = None) -> Key:
        """The symmetric key (a passphrase's under ``kdf``, or a fresh salt)."""
        from vdistream.pipeline.keys import ScryptParams, load_key

        passphrase = self._passphrase()
        params = ScryptParams.from_dict(kdf) if kdf and passphrase is not None else None
        # scrypt takes a noticeable fraction of a second: keep it off the event loop
        return await anyio.to_thread.run_sync(
            lambda: load_key(
                key_file=self.key_file, env=self.env, passphrase=passphrase, kdf=params
            )
        )

    async def keks(self) -> list[Key | Recipient]:
        """What a new backup's data key is wrapped for: the symmetric key, if any, and
        every recipient."""
        from vdistream.pipeline.envelope import load_recipient

        keks: list[Key | Recipient] = [await self.load()] if self.symmetric else []
        keks.extend([await anyio.to_thread.run_sync(load_recipient, p) for p in self.recipients])
        return keks

    async def openers(self) -> list[Key | Identity | Passphrase]:
        """What may open a backup's envelope: the symmetric key or passphrase, then the
        identity."""
        from vdistream.pipeline.envelope import Passphrase, load_identity

        openers: list[Key | Identity | Passphrase] = []
        passphrase = self._passphrase()
        if passphrase is not None:
            if self.key_file is not None or self.env is not None:
                raise ConfigError("give only one key source, got a key and a passphrase")
            openers.append(Passphrase(passphrase, origin=f"passphrase in {self.passphrase_env}"))
        elif self.symmetric:
            openers.append(await self.load())
        if self.identity_file is not None:
            openers.append(await anyio.to_thread.run_sync(load_identity, self.identity_file))
        return openers


async def backup_key(keys: KeySource | None) -> Key | None:
    """The key a new backup is encrypted with (None: not encrypted): a fresh random data
    key wrapped for the key source's key and recipients (``DataKey``; its ``describe``
    is the manifest's key block)."""
    if keys is None or not keys.given:
        return None
    if not keys.encrypts:
        if keys.optional:
            return None  # the daemon's identity reads its backups; it does not encrypt
        raise ConfigError(
            f"{keys.identity_file} (--decrypt-identity) opens backups; to encrypt to it "
            "give its public key (--encrypt-recipient FILE)"
        )
    from vdistream.pipeline.envelope import new_data_key

    keks = await keys.keks()
    return await anyio.to_thread.run_sync(new_data_key, keks)


async def pipeline_for(manifest: Manifest, keys: KeySource | None) -> PipelineConfig:
    """The manifest's stages, with the data key unwrapped (or, for a backup made before
    envelopes, the key loaded and checked against its fingerprint): a wrong or missing
    key is reported as such before any byte is read."""
    encryption = (manifest.pipeline or {}).get("encryption")
    key = None
    if not encryption and keys is not None and keys.given and not keys.optional:
        raise KeyNotNeededError(
            f"backup {manifest.backup_id} is not encrypted: leave out {keys.option}"
        )
    if encryption:
        key = await _data_key(manifest, keys)
    return PipelineConfig.from_manifest(manifest.pipeline, key)


async def _data_key(manifest: Manifest, keys: KeySource | None) -> Key:
    from vdistream.pipeline.envelope import Envelope

    backup_id = manifest.backup_id
    block = manifest.key_block or {}
    envelope = Envelope.parse(block)
    if keys is None or not (keys.symmetric or keys.identity_file is not None):
        if keys is not None and keys.recipients:
            raise KeyMissingError(
                f"backup {backup_id} is encrypted and a public key (--encrypt-recipient) "
                "cannot decrypt it: give the private key of one of its recipients "
                "(--decrypt-identity FILE) or its key"
            )
        raise KeyMissingError(f"backup {backup_id} is encrypted: {_GIVE_KEY}")
    if envelope is None:  # made before envelopes: the streams' key is the user's key
        if not keys.symmetric:
            raise KeyMissingError(
                f"backup {backup_id} was made before envelope encryption: it opens only "
                "with its own key (--encrypt-key-file, --encrypt-key-env or "
                "--encrypt-passphrase-env), not with a private key"
            )
        key = await keys.load(block.get("kdf"))
        key.check_fingerprint(str(block.get("fingerprint", "")), where=backup_id)
        return key
    return await _open(envelope, await keys.openers(), where=backup_id)


async def _open(
    envelope: Envelope, openers: Sequence[Key | Identity | Passphrase], *, where: str
) -> Key:
    """The data key, opened with the first of ``openers`` that is one of its KEKs; the
    first refusal if none is."""
    refusals: list[WrongKeyError] = []
    for opener in openers:
        try:
            return await anyio.to_thread.run_sync(
                lambda o=opener: envelope.open(o, where=where)  # type: ignore[misc]
            )
        except WrongKeyError as exc:
            refusals.append(exc)
    if not refusals:
        raise KeyMissingError(f"backup {where} is encrypted: {_GIVE_KEY}")
    raise refusals[0]


# --- rewrapping: key rotate, add, remove ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyRef:
    """One key named to the key commands: ``file`` (a key file, an X25519 public key or
    an X25519 private key, told apart by content), ``env`` (a variable holding a key),
    ``passphrase_env`` (a variable holding a passphrase) or ``fingerprint`` (a wrap's
    fingerprint as ``key list`` shows it; for removal only). Exactly one."""

    file: str | None = None
    env: str | None = None
    passphrase_env: str | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.file, self.env, self.passphrase_env, self.fingerprint) if v]
        if len(given) != 1:
            raise ConfigError("a key is named by exactly one of a file, a variable, a fingerprint")

    def __str__(self) -> str:
        if self.file is not None:
            return self.file
        if self.env is not None:
            return f"the key in {self.env}"
        if self.passphrase_env is not None:
            return f"the passphrase in {self.passphrase_env}"
        return f"fingerprint {self.fingerprint}"

    async def resolve(self) -> Key | Recipient | Identity | Passphrase | str:
        """The key itself (a fingerprint stays a string)."""
        from vdistream.pipeline.envelope import Passphrase, read_key_or_recipient
        from vdistream.pipeline.keys import load_key

        if self.file is not None:
            return await anyio.to_thread.run_sync(read_key_or_recipient, self.file)
        if self.env is not None:
            return load_key(env=self.env)
        if self.passphrase_env is not None:
            text = os.environ.get(self.passphrase_env)
            if not text:
                raise KeyMissingError(
                    f"the environment variable {self.passphrase_env} holds no passphrase"
                )
            return Passphrase(text, origin=f"passphrase in {self.passphrase_env}")
        assert self.fingerprint is not None
        return self.fingerprint.strip().lower()


@dataclasses.dataclass
class RewrapReport:
    """What a rewrap did, per backup of the destination."""

    changed: list[str] = dataclasses.field(default_factory=list)
    #: (backup, why nothing was to be done): not encrypted, already done
    unchanged: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: (backup, the one-line error): nothing was changed in it
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: manifests that could not be read (their messages)
    unreadable: list[str] = dataclasses.field(default_factory=list)
    #: backups made before envelopes, now rewrapped: their pre-envelope key still opens
    #: them (their streams are encrypted with it)
    legacy: list[str] = dataclasses.field(default_factory=list)
    #: (backup, its owner "host, pid N"): being written when the command ended, so not
    #: rewrapped; its manifest will hold the keys its job was given
    running: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unreadable and not self.running

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "changed": self.changed,
            "unchanged": [{"id": i, "reason": r} for i, r in self.unchanged],
            "failed": [{"id": i, "error": e} for i, e in self.failed],
            "unreadable": self.unreadable,
            "legacy": self.legacy,
            "running": [{"id": i, "owner": o} for i, o in self.running],
        }


class _Mark(Protocol):
    backup_id: str
    alive: bool | None

    def owner(self) -> str: ...


@runtime_checkable
class _MarkedStorage(Protocol):
    """A storage whose ``in_progress`` leaves owner marks (file, S3, Azure)."""

    async def owner_marks(self) -> Sequence[_Mark]: ...


@dataclasses.dataclass
class _NewKek:
    """A KEK to add: what is wrapped for, and how to tell it is already there."""

    kek: Key | Recipient
    passphrase: Passphrase | None = None

    def present(self, envelope: Envelope) -> bool:
        from vdistream.pipeline.envelope import Recipient

        if self.passphrase is not None:
            return bool(_passphrase_wraps(envelope, self.passphrase))
        kind = "x25519" if isinstance(self.kek, Recipient) else "key"
        if kind == "key" and self.kek.kdf is not None:  # type: ignore[union-attr]
            kind = "passphrase"
        return envelope.find(kind, self.kek.fingerprint) is not None


def _passphrase_wraps(envelope: Envelope, passphrase: Passphrase) -> list[Wrap]:
    return [
        w
        for w in envelope.wraps
        if w.kind == "passphrase"
        and w.kdf is not None
        and passphrase.key_for(w.kdf).fingerprint == w.fingerprint
    ]


def _matching(envelope: Envelope, key: Key | Recipient | Identity | Passphrase | str) -> list[Wrap]:
    """The wraps of ``envelope`` that belong to ``key`` (blocking: scrypt)."""
    from vdistream.pipeline.envelope import Identity, Passphrase, Recipient

    if isinstance(key, str):
        return [w for w in envelope.wraps if w.fingerprint == key]
    if isinstance(key, Passphrase):
        return _passphrase_wraps(envelope, key)
    if isinstance(key, Recipient | Identity):
        return [w for w in envelope.wraps if (w.kind, w.fingerprint) == ("x25519", key.fingerprint)]
    return [w for w in envelope.wraps if w.kind == "key" and w.fingerprint == key.fingerprint]


async def _new_keks(refs: Sequence[KeyRef]) -> list[_NewKek]:
    from vdistream.pipeline.envelope import Identity, Passphrase

    new: list[_NewKek] = []
    for ref in refs:
        key = await ref.resolve()
        if isinstance(key, str):
            raise ConfigError("a new key is a file or a variable, not a fingerprint")
        if isinstance(key, Passphrase):
            # one fresh salt for this run: one scrypt derivation, not one per backup
            new.append(_NewKek(await anyio.to_thread.run_sync(key.new_key), key))
        elif isinstance(key, Identity):
            new.append(_NewKek(key.recipient))  # wrap for its public key
        else:
            new.append(_NewKek(key))
    return new


async def _openers(refs: Sequence[KeyRef]) -> list[Key | Identity | Passphrase]:
    from vdistream.pipeline.envelope import Recipient

    openers: list[Key | Identity | Passphrase] = []
    for ref in refs:
        key = await ref.resolve()
        if isinstance(key, Recipient):
            raise ConfigError(
                f"{ref} is a public key, which cannot open a backup: give the private key"
            )
        if isinstance(key, str):
            raise ConfigError("a fingerprint cannot open a backup: give the key itself")
        openers.append(key)
    return openers


#: a manifest -> its new key block, or None (nothing to do) with the reason; the note
#: "legacy" marks a pre-envelope backup rewrapped
_Change = Callable[[Manifest], Awaitable[tuple[dict[str, Any] | None, str]]]


async def _rewrap(
    dest: str, change: _Change, *, done: str, backups: Sequence[str] = ()
) -> RewrapReport:
    """Apply ``change`` to every backup in ``dest`` (or those named in ``backups``), one
    after the other, each under its mark; a block that comes back the same is reported
    unchanged, as ``done``. A backup's failure is reported and the others go on.

    Backups being written meanwhile (every backup, not ``backups``): their marks are read
    after the first pass, then the destination is listed again and what was committed
    since is done too; a marked backup still without a manifest by then is reported in
    ``running``. So a backup that was running at any time before the marks were read is
    either rewrapped or reported, never silently left with the old keys."""
    from vdistream.operations.core import opened_storage

    report = RewrapReport()
    async with opened_storage(dest) as storage:
        if backups:
            for backup_id in backups:
                await _rewrap_guarded(storage, backup_id, change, report, done)
            return report
        seen = await _manifest_ids(storage)
        manifests, report.unreadable = await list_manifests(storage)
        for manifest in manifests:
            seen.add(manifest.backup_id)
            await _rewrap_guarded(storage, manifest.backup_id, change, report, done)
        marks = list(await storage.owner_marks()) if isinstance(storage, _MarkedStorage) else []
        for backup_id in sorted(await _manifest_ids(storage) - seen):
            seen.add(backup_id)  # committed while the first pass ran
            await _rewrap_guarded(storage, backup_id, change, report, done)
        report.running = sorted(
            {
                (m.backup_id, m.owner())
                for m in marks
                if m.alive is not False and m.backup_id not in seen
            }
        )
    return report


async def _manifest_ids(storage: Storage) -> set[str]:
    """The ids of the backups with a committed manifest (names only: nothing is read)."""
    ids = set()
    for key in await storage.list():
        backup_id, _, name = key.rpartition("/")
        if name == MANIFEST_NAME and backup_id and "/" not in backup_id:
            ids.add(backup_id)
    return ids


async def _rewrap_guarded(
    storage: Storage, backup_id: str, change: _Change, report: RewrapReport, done: str
) -> None:
    try:
        await _rewrap_one(storage, backup_id, change, report, done)
    except (PipelineError, CatalogError, StorageError, ConfigError) as exc:
        report.failed.append((backup_id, str(exc)))


async def _rewrap_one(
    storage: Storage,
    backup_id: str,
    change: _Change,
    report: RewrapReport,
    done: str,
) -> None:
    from vdistream.catalog.store import replace_manifest

    # the mark: a concurrent rewrap of this backup cannot interleave (a prune takes no
    # mark: deleting a backup meanwhile makes the replace fail, or, in the moment
    # between its check and its write, leaves a manifest without streams)
    async with storage.in_progress(backup_id):
        manifest = await read_manifest(storage, backup_id)  # again, under the mark
        if manifest.key_block is None:
            report.unchanged.append((backup_id, "not encrypted"))
            return
        block, note = await change(manifest)
        if block is None or block == manifest.key_block:
            report.unchanged.append((backup_id, note if block is None else done))
            return
        await replace_manifest(storage, manifest.with_key_block(block))
    report.changed.append(backup_id)
    if note == "legacy":
        report.legacy.append(backup_id)


async def _unlocked(
    manifest: Manifest, openers: Sequence[Key | Identity | Passphrase]
) -> tuple[Envelope, Key, bool]:
    """The manifest's envelope and data key; a pre-envelope block becomes an envelope
    with no wraps yet (``legacy``), its data key the key that opens it."""
    from vdistream.pipeline.envelope import DataKey, Envelope, Passphrase
    from vdistream.pipeline.keys import Key, ScryptParams

    block = manifest.key_block or {}
    envelope = Envelope.parse(block)
    if envelope is not None:
        return envelope, await _open(envelope, openers, where=manifest.backup_id), False
    fingerprint = str(block.get("fingerprint", ""))
    refusal = ""
    for opener in openers:
        key: Key | None = None
        if isinstance(opener, Passphrase) and block.get("kdf"):
            kdf = ScryptParams.from_dict(block["kdf"])
            key = await anyio.to_thread.run_sync(opener.key_for, kdf)
        elif isinstance(opener, Key):
            key = opener
        if key is None:
            continue
        if key.fingerprint == fingerprint:
            data_key = DataKey(key.reveal())
            return Envelope(data_key=fingerprint, wraps=(), legacy=True), data_key, True
        refusal = refusal or f"{key.origin} has fingerprint {key.fingerprint}"
    raise WrongKeyError(
        "the key does not match the one this backup was encrypted with: "
        f"{refusal or 'a private key cannot open a backup made before envelopes'}; "
        f"backup {manifest.backup_id} (made before envelope encryption) needs {fingerprint}"
    )


async def rotate_keys(
    dest: str, old: Sequence[KeyRef], new: Sequence[KeyRef], *, backups: Sequence[str] = ()
) -> RewrapReport:
    """Rewrap every backup's data key: opened with ``old``, wrapped for ``new``, and
    ``old``'s wraps removed, so the old key opens it no more (a backup made before
    envelopes is the exception: its streams are encrypted with the old key itself, which
    therefore still opens it; ``report.legacy`` lists them). A backup that ``old`` does
    not open but that already has every new key is reported unchanged ("already
    rotated"): a rerun after an interruption finishes the job."""
    if not old or not new:
        raise ConfigError("key rotate needs the old key and the new one")
    openers = await _openers(old)
    new_keks = await _new_keks(new)
    old_keys = openers  # the same objects: a passphrase derives once per salt

    async def change(manifest: Manifest) -> tuple[dict[str, Any] | None, str]:
        try:
            envelope, data_key, legacy = await _unlocked(manifest, openers)
        except WrongKeyError:
            envelope_now = _parse(manifest)
            if envelope_now is not None and await _all_present(envelope_now, new_keks):
                return None, "already rotated"
            raise

        def rewrapped() -> dict[str, Any]:
            # a new passphrase comes with a fresh salt, so its wrap never equals one made
            # before: ask whether it already opens the backup (else each rerun adds one)
            missing = [n.kek for n in new_keks if not n.present(envelope)]
            added, _ = envelope.added(data_key, missing)
            old_wraps = [w for key in old_keys for w in _matching(added, key)]
            # a key given as both old and new stays
            gone = [w for w in old_wraps if not any(n.present(_only(w)) for n in new_keks)]
            return added.without(gone, where=manifest.backup_id).to_dict()

        block = await anyio.to_thread.run_sync(rewrapped)
        return block, "legacy" if legacy else ""

    return await _rewrap(dest, change, done="already rotated", backups=backups)


def _only(wrap: Wrap) -> Envelope:
    from vdistream.pipeline.envelope import Envelope

    return Envelope(data_key="", wraps=(wrap,))


def _parse(manifest: Manifest) -> Envelope | None:
    from vdistream.pipeline.envelope import Envelope

    return Envelope.parse(manifest.key_block or {})


async def _all_present(envelope: Envelope, new_keks: Sequence[_NewKek]) -> bool:
    return await anyio.to_thread.run_sync(lambda: all(n.present(envelope) for n in new_keks))


async def add_keys(
    dest: str, key: Sequence[KeyRef], new: Sequence[KeyRef], *, backups: Sequence[str] = ()
) -> RewrapReport:
    """Wrap every backup's data key (opened with ``key``) for ``new`` too; the keys it
    had keep opening it. A backup that already has every new key is left unchanged."""
    if not key or not new:
        raise ConfigError("key add needs a key that opens the backups and the new one")
    openers = await _openers(key)
    new_keks = await _new_keks(new)

    async def change(manifest: Manifest) -> tuple[dict[str, Any] | None, str]:
        current = _parse(manifest)
        if current is not None and await _all_present(current, new_keks):
            return None, "already has the new key"
        envelope, data_key, legacy = await _unlocked(manifest, openers)
        added, _ = await anyio.to_thread.run_sync(
            lambda: envelope.added(data_key, [n.kek for n in new_keks if not n.present(envelope)])
        )
        return added.to_dict(), "legacy" if legacy else ""

    return await _rewrap(dest, change, done="already has the new key", backups=backups)


async def remove_keys(
    dest: str, old: Sequence[KeyRef], *, backups: Sequence[str] = ()
) -> RewrapReport:
    """Remove the wraps of ``old`` (keys, public or private keys, passphrases or
    fingerprints) from every backup; no key is needed to open them. Refuses, for that
    backup, to remove its last wrap. A backup without such a wrap is left unchanged."""
    if not old:
        raise ConfigError("key remove needs the key to remove")
    keys = [await ref.resolve() for ref in old]

    async def change(manifest: Manifest) -> tuple[dict[str, Any] | None, str]:
        envelope = _parse(manifest)
        recorded = manifest.key_block or {}
        # the key a pre-envelope backup's streams are encrypted with cannot be removed
        streams_key = str(recorded.get("fingerprint") if envelope is None else envelope.data_key)
        kdf = recorded.get("kdf") if envelope is None else None
        if (envelope is None or envelope.legacy) and await anyio.to_thread.run_sync(
            lambda: any(_is_streams_key(streams_key, kdf, key) for key in keys)
        ):
            raise PipelineError(
                f"made before envelope encryption: its streams are encrypted with key "
                f"{streams_key} itself, which therefore cannot be removed from it (only a "
                "new backup is beyond it)"
            )
        if envelope is None:
            return None, "made before envelope encryption: its key is not wrapped"

        def removed() -> dict[str, Any] | None:
            gone = [w for key in keys for w in _matching(envelope, key)]
            if not gone:
                return None
            return envelope.without(gone, where=manifest.backup_id).to_dict()

        block = await anyio.to_thread.run_sync(removed)
        return block, "" if block is not None else "has none of these keys"

    return await _rewrap(dest, change, done="has none of these keys", backups=backups)


def _is_streams_key(
    fingerprint: str, kdf: object, key: Key | Recipient | Identity | Passphrase | str
) -> bool:
    """Whether ``key`` (a key, a passphrase under the block's ``kdf``, or a fingerprint)
    is the key with ``fingerprint``: a pre-envelope backup's own (blocking: scrypt)."""
    from vdistream.pipeline.envelope import Passphrase
    from vdistream.pipeline.keys import Key, ScryptParams

    if isinstance(key, str):
        return key == fingerprint
    if isinstance(key, Passphrase) and isinstance(kdf, dict):
        return key.key_for(ScryptParams.from_dict(kdf)).fingerprint == fingerprint
    return isinstance(key, Key) and key.fingerprint == fingerprint


async def list_keys(dest: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Per backup in ``dest``: whether it is encrypted and what opens it (no secrets)."""
    from vdistream.operations.core import opened_storage

    rows: list[dict[str, Any]] = []
    async with opened_storage(dest) as storage:
        manifests, problems = await list_manifests(storage)
    for manifest in manifests:
        block = manifest.key_block
        row: dict[str, Any] = {"id": manifest.backup_id, "encrypted": block is not None}
        if block is not None:
            try:
                envelope = _parse(manifest)
            except PipelineError as exc:
                problems.append(f"backup {manifest.backup_id}: {exc}")
                continue
            if envelope is None:
                kind = "passphrase" if block.get("kdf") else "key"
                row["format"] = "pre-envelope"
                row["keys"] = [{"type": kind, "fingerprint": block.get("fingerprint")}]
            else:
                row["format"] = "envelope" + (" (legacy key)" if envelope.legacy else "")
                row["keys"] = [
                    {"type": w.kind, "fingerprint": w.fingerprint} for w in envelope.wraps
                ]
        rows.append(row)
    return rows, problems
