"""Envelope encryption: each backup's own random data key, wrapped for key-encryption keys.

A new encrypted backup is encrypted (``vdistream.pipeline.encrypt``) with a fresh random
32-byte *data key*. The manifest keeps that data key only *wrapped*, once for each
key-encryption key (KEK) that may open the backup:

* ``key``: a symmetric key (a key file or an environment variable, ``keys.Key``);
* ``passphrase``: a key stretched from a passphrase with scrypt (its salt and
  parameters recorded with the wrap, one salt per wrap);
* ``x25519``: an X25519 public key (a *recipient*). Whoever holds the matching private
  key (an *identity*) can open the backup; the host that writes the backup needs only
  the public key, so it cannot read its own backups back.

Rotating a KEK rewraps the data key in the manifest: the streams are never touched.

The key block, ``manifest.pipeline["encryption"]["key"]`` (nothing secret)::

    {"envelope": 1,
     "data_key": "<fingerprint of the data key>",
     "wrapped": [
        {"type": "key", "fingerprint": F, "nonce": N, "wrapped": W},
        {"type": "passphrase", "fingerprint": F, "kdf": {scrypt...}, "nonce": N, "wrapped": W},
        {"type": "x25519", "fingerprint": F, "public_key": P, "ephemeral": E,
         "nonce": N, "wrapped": W}]}

Hex throughout. ``fingerprint`` names the KEK (``Key.fingerprint`` for the symmetric
kinds; for a recipient the first 16 bytes of ``SHA-256("vdistream/v1/x25519-recipient"
|| public key)``), so the right wrap is found without trying each one, and a wrong key is
reported before any stream is read. A manifest written before envelopes (``"key":
{"fingerprint", "kdf"}``) has no ``envelope``: its streams are encrypted with the key
itself (``Envelope.parse`` returns None for it). ``legacy: true`` marks a block made
from such a manifest by a rotation: the data key *is* the pre-envelope key, which
therefore still opens it (the streams were not re-encrypted), and says so.

Wrapping, with the ``cryptography`` library only (no hand-made primitives):

* symmetric: ``wrap_key = HKDF-SHA256(KEK, salt=nonce, info="vdistream/v1/envelope/
  wrap-key")`` (a label of its own: the KEK's other uses, fingerprint and stream
  subkeys, derive with other labels), then AES-256-GCM with the random 12-byte nonce;
* X25519: a fresh ephemeral key pair per wrap (as age and HPKE do),
  ``shared = X25519(ephemeral, recipient)``, ``wrap_key = HKDF-SHA256(shared,
  salt=ephemeral_pub || recipient_pub, info="vdistream/v1/envelope/x25519")``, then
  AES-256-GCM as above. The library refuses low-order points (an all-zero secret).

The associated data of every wrap is ``"vdistream/v1/envelope|" type "|" fingerprint
"|" data_key``: a wrap moved to another entry or to a backup with another data key
fails its tag. An unwrapped key whose fingerprint is not ``data_key`` is refused too.

Key files. ``generate_identity`` writes an X25519 private key as PKCS#8 PEM (mode 0600,
never overwriting) and its public key as SubjectPublicKeyInfo PEM; files made by
``openssl genpkey -algorithm X25519`` (and ``openssl pkey -pubout``) work as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vdistream.errors import KeyMissingError, PipelineError, WrongKeyError
from vdistream.pipeline.keys import KEY_SIZE, Key, ScryptParams, write_new_file

__all__ = (
    "ENVELOPE_VERSION",
    "MAX_WRAPS",
    "DataKey",
    "Envelope",
    "Identity",
    "Opener",
    "Passphrase",
    "Recipient",
    "Wrap",
    "generate_identity",
    "load_identity",
    "load_recipient",
    "new_data_key",
    "read_key_or_recipient",
    "recipient_fingerprint",
    "wrap_for_key",
    "wrap_for_recipient",
)

ENVELOPE_VERSION: Final = 1
_WRAP_LABEL = b"vdistream/v1/envelope/wrap-key"
_X25519_LABEL = b"vdistream/v1/envelope/x25519"
_RECIPIENT_LABEL = b"vdistream/v1/x25519-recipient"
_NONCE = 12
_WRAPPED = KEY_SIZE + 16  # the data key and the GCM tag
_KINDS = ("key", "passphrase", "x25519")
_PEM_PUBLIC = b"-----BEGIN PUBLIC KEY-----"
_PEM_PRIVATE = b"-----BEGIN PRIVATE KEY-----"
_PEM_ENCRYPTED = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
#: the most wraps a manifest may list (a damaged or hostile one must not cost hours)
MAX_WRAPS: Final = 64


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


def _aad(kind: str, fingerprint: str, data_key: str) -> bytes:
    return f"vdistream/v1/envelope|{kind}|{fingerprint}|{data_key}".encode("ascii")


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def recipient_fingerprint(raw_public: bytes) -> str:
    return hashlib.sha256(_RECIPIENT_LABEL + raw_public).digest()[:16].hex()


@dataclasses.dataclass(frozen=True)
class Recipient:
    """An X25519 public key that backups may be encrypted to (nothing secret)."""

    public_key: bytes  # 32 raw bytes
    origin: str = "X25519 public key"

    def __post_init__(self) -> None:
        if len(self.public_key) != 32:
            raise PipelineError(f"{self.origin}: an X25519 public key is 32 bytes")

    @property
    def fingerprint(self) -> str:
        return recipient_fingerprint(self.public_key)

    def __str__(self) -> str:
        return f"{self.origin} (fingerprint {self.fingerprint})"


class Identity:
    """An X25519 private key (opens backups wrapped for its public key); ``repr`` and
    ``str`` show only its public fingerprint, and it cannot be pickled."""

    __slots__ = ("_private", "origin", "recipient")

    def __init__(self, private: X25519PrivateKey, *, origin: str = "X25519 private key") -> None:
        self._private = private
        self.origin = origin
        self.recipient = Recipient(_raw_public(private.public_key()), origin=origin)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of its public key (what the manifest records)."""
        return self.recipient.fingerprint

    def exchange(self, peer: bytes) -> bytes:
        """The X25519 shared secret with the raw public key ``peer``."""
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(peer))
        except ValueError as exc:  # a low-order point: a damaged or hostile manifest
            raise PipelineError(f"invalid X25519 ephemeral key in the manifest: {exc}") from exc

    def __repr__(self) -> str:
        return f"<Identity {self.fingerprint} from {self.origin}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("an Identity cannot be pickled")


@dataclasses.dataclass(frozen=True)
class Wrap:
    """The data key wrapped for one KEK: one entry of the key block's ``wrapped``."""

    kind: str  # "key", "passphrase", "x25519"
    fingerprint: str
    nonce: bytes
    wrapped: bytes
    kdf: ScryptParams | None = None  # passphrase
    public_key: bytes | None = None  # x25519: the recipient
    ephemeral: bytes | None = None  # x25519: the sender's one-time public key

    NAMES: ClassVar[dict[str, str]] = {
        "key": "key",
        "passphrase": "passphrase",
        "x25519": "X25519 recipient",
    }

    def describe(self) -> str:
        """``key 0123...``, ``passphrase 0123...``, ``X25519 recipient 0123...``."""
        return f"{self.NAMES[self.kind]} {self.fingerprint}"

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": self.kind,
            "fingerprint": self.fingerprint,
            "nonce": self.nonce.hex(),
            "wrapped": self.wrapped.hex(),
        }
        if self.kdf is not None:
            entry["kdf"] = self.kdf.to_dict()
        if self.public_key is not None:
            entry["public_key"] = self.public_key.hex()
        if self.ephemeral is not None:
            entry["ephemeral"] = self.ephemeral.hex()
        return entry

    @classmethod
    def from_dict(cls, entry: object) -> Wrap:
        if not isinstance(entry, Mapping):
            raise PipelineError("malformed key block in the manifest: a wrap is not an object")
        kind = entry.get("type")
        if kind not in _KINDS:
            raise PipelineError(f"unknown kind of wrapped key {kind!r} in the manifest")
        try:
            fingerprint = str(entry["fingerprint"])
            nonce = bytes.fromhex(str(entry["nonce"]))
            wrapped = bytes.fromhex(str(entry["wrapped"]))
            kdf = _scrypt(entry["kdf"]) if kind == "passphrase" else None
            public = bytes.fromhex(str(entry["public_key"])) if kind == "x25519" else None
            ephemeral = bytes.fromhex(str(entry["ephemeral"])) if kind == "x25519" else None
        except (KeyError, ValueError, TypeError) as exc:
            raise PipelineError(f"malformed {kind} wrap in the manifest: {exc!r}") from exc
        if len(nonce) != _NONCE or len(wrapped) != _WRAPPED:
            raise PipelineError(f"malformed {kind} wrap in the manifest: wrong sizes")
        if public is not None and (
            len(public) != 32 or recipient_fingerprint(public) != fingerprint
        ):
            raise PipelineError("malformed X25519 wrap in the manifest: public key")
        if ephemeral is not None and len(ephemeral) != 32:
            raise PipelineError("malformed X25519 wrap in the manifest: ephemeral key")
        return cls(kind, fingerprint, nonce, wrapped, kdf, public, ephemeral)


def _scrypt(kdf: object) -> ScryptParams:
    if not isinstance(kdf, Mapping):
        raise PipelineError("malformed passphrase wrap in the manifest: its kdf is not an object")
    return ScryptParams.from_dict(kdf)


def _kind_of(key: Key) -> str:
    return "passphrase" if key.kdf is not None else "key"


def _seal(wrap_key: bytes, nonce: bytes, data_key: Key, aad: bytes) -> bytes:
    return AESGCM(wrap_key).encrypt(nonce, data_key.reveal(), aad)


def wrap_for_key(data_key: Key, kek: Key) -> Wrap:
    """The data key wrapped for a symmetric KEK (a key, or a passphrase's key)."""
    kind, nonce = _kind_of(kek), secrets.token_bytes(_NONCE)
    aad = _aad(kind, kek.fingerprint, data_key.fingerprint)
    sealed = _seal(_hkdf(kek.reveal(), nonce, _WRAP_LABEL), nonce, data_key, aad)
    return Wrap(kind, kek.fingerprint, nonce, sealed, kdf=kek.kdf)


def _shared(private: X25519PrivateKey, peer: bytes) -> bytes | None:
    """The X25519 shared secret; None for a low-order ``peer`` (the library refuses the
    all-zero secret such a point gives: nobody's private key could open that wrap)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError:
        return None


def wrap_for_recipient(data_key: Key, recipient: Recipient) -> Wrap:
    """The data key wrapped for an X25519 public key (a fresh ephemeral key per wrap)."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = _raw_public(ephemeral.public_key())
    shared = _shared(ephemeral, recipient.public_key)
    if shared is None:
        raise PipelineError(f"{recipient.origin} is not a usable X25519 public key")
    wrap_key = _hkdf(shared, ephemeral_public + recipient.public_key, _X25519_LABEL)
    nonce = secrets.token_bytes(_NONCE)
    aad = _aad("x25519", recipient.fingerprint, data_key.fingerprint)
    sealed = _seal(wrap_key, nonce, data_key, aad)
    return Wrap(
        "x25519",
        recipient.fingerprint,
        nonce,
        sealed,
        public_key=recipient.public_key,
        ephemeral=ephemeral_public,
    )


class Passphrase:
    """A passphrase that opens envelopes; remembers the key it derived for each set of
    scrypt parameters (salt), so a rotation over many backups derives each key once.
    Never shown in a ``repr``, never pickled."""

    __slots__ = ("_derived", "_text", "origin")

    def __init__(self, text: str, *, origin: str = "passphrase") -> None:
        if not text:
            raise PipelineError("the passphrase is empty")
        self._text = text
        self._derived: dict[ScryptParams, Key] = {}
        self.origin = origin

    def key_for(self, kdf: ScryptParams) -> Key:
        """The key this passphrase gives under ``kdf`` (scrypt, ~0.1 s the first time)."""
        key = self._derived.get(kdf)
        if key is None:
            key = Key(kdf.derive(self._text), origin=self.origin, kdf=kdf)
            self._derived[kdf] = key
        return key

    def new_key(self) -> Key:
        """A key from this passphrase with a fresh salt (for wrapping)."""
        return self.key_for(ScryptParams.new())

    def __repr__(self) -> str:
        return f"<Passphrase from {self.origin}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Passphrase cannot be pickled")


#: what may open an envelope: a symmetric key, a passphrase, or an identity
Opener = Key | Identity | Passphrase


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A backup's key block: the data key's fingerprint and its wraps."""

    data_key: str
    wraps: tuple[Wrap, ...]
    legacy: bool = False  # the data key is a pre-envelope key (module docstring)

    def to_dict(self) -> dict[str, Any]:
        block: dict[str, Any] = {
            "envelope": ENVELOPE_VERSION,
            "data_key": self.data_key,
            "wrapped": [w.to_dict() for w in self.wraps],
        }
        if self.legacy:
            block["legacy"] = True
        return block

    @classmethod
    def parse(cls, block: object) -> Envelope | None:
        """The envelope in a manifest's key block; None for a pre-envelope block."""
        if not isinstance(block, Mapping) or "envelope" not in block:
            return None
        if block.get("envelope") != ENVELOPE_VERSION:
            raise PipelineError(
                f"the manifest's key block has envelope version {block.get('envelope')!r}; "
                f"this vdistream reads version {ENVELOPE_VERSION}"
            )
        wraps = block.get("wrapped")
        if not isinstance(wraps, list) or not 1 <= len(wraps) <= MAX_WRAPS:
            raise PipelineError(f"malformed key block in the manifest: 1..{MAX_WRAPS} wraps")
        return cls(
            data_key=str(block.get("data_key", "")),
            wraps=tuple(Wrap.from_dict(w) for w in wraps),
            legacy=block.get("legacy") is True,
        )

    def accepted(self) -> str:
        """What opens it, for messages: ``key 01.., X25519 recipient 23..``."""
        listed = ", ".join(w.describe() for w in self.wraps)
        return listed + (f", key {self.data_key} (its pre-envelope key)" if self.legacy else "")

    def find(self, kind: str, fingerprint: str) -> Wrap | None:
        return next((w for w in self.wraps if (w.kind, w.fingerprint) == (kind, fingerprint)), None)

    def _checked(self, material: bytes, *, where: str) -> DataKey:
        key = DataKey(material, self)
        if key.fingerprint != self.data_key:
            raise PipelineError(f"the unwrapped data key does not match the manifest ({where})")
        return key

    def _unwrap(self, wrap: Wrap, wrap_key: bytes, *, where: str) -> DataKey:
        aad = _aad(wrap.kind, wrap.fingerprint, self.data_key)
        try:
            material = AESGCM(wrap_key).decrypt(wrap.nonce, wrap.wrapped, aad)
        except InvalidTag as exc:
            raise PipelineError(
                f"the wrapped data key for {wrap.describe()} fails authentication: the "
                f"manifest's key block is damaged ({where})"
            ) from exc
        return self._checked(material, where=where)

    def open(self, opener: Opener, *, where: str = "") -> DataKey:
        """The data key, unwrapped with ``opener``.

        ``WrongKeyError`` ("the key does not match the one this backup was encrypted
        with: ...", naming what the backup accepts) when the opener is not one of its
        KEKs; ``PipelineError`` when a wrap is damaged. A passphrase is tried against
        each passphrase wrap (one scrypt derivation each): call from a worker thread.
        """
        suffix = f" ({where})" if where else ""
        if isinstance(opener, Identity):
            wrap = self.find("x25519", opener.fingerprint)
            if wrap is None:
                raise WrongKeyError(
                    "the key does not match the one this backup was encrypted with: "
                    f"{opener.origin} is the private key of X25519 recipient "
                    f"{opener.fingerprint}; the backup opens with {self.accepted()}{suffix}"
                )
            assert wrap.ephemeral is not None
            assert wrap.public_key is not None
            shared = opener.exchange(wrap.ephemeral)
            wrap_key = _hkdf(shared, wrap.ephemeral + wrap.public_key, _X25519_LABEL)
            return self._unwrap(wrap, wrap_key, where=where)
        if isinstance(opener, Passphrase):
            for wrap in self.wraps:
                if wrap.kind == "passphrase" and wrap.kdf is not None:
                    key = opener.key_for(wrap.kdf)
                    if key.fingerprint == wrap.fingerprint:
                        return self._unwrap(
                            wrap, _hkdf(key.reveal(), wrap.nonce, _WRAP_LABEL), where=where
                        )
            raise WrongKeyError(
                "the key does not match the one this backup was encrypted with: the "
                f"{opener.origin} opens none of its wraps; the backup opens with "
                f"{self.accepted()}{suffix}"
            )
        wrap = self.find(_kind_of(opener), opener.fingerprint)
        if wrap is None:
            if self.legacy and opener.fingerprint == self.data_key:
                return self._checked(opener.reveal(), where=where)
            raise WrongKeyError(
                "the key does not match the one this backup was encrypted with: "
                f"{opener.origin} has fingerprint {opener.fingerprint}; the backup opens "
                f"with {self.accepted()}{suffix}"
            )
        return self._unwrap(wrap, _hkdf(opener.reveal(), wrap.nonce, _WRAP_LABEL), where=where)

    def added(self, data_key: Key, keks: Iterable[Key | Recipient]) -> tuple[Envelope, int]:
        """This envelope with ``data_key`` wrapped for each KEK it lacks; and how many
        were added. A passphrase KEK must come with a fresh salt (``ScryptParams.new``)."""
        wraps = list(self.wraps)
        added = 0
        for kek in keks:
            kind = "x25519" if isinstance(kek, Recipient) else _kind_of(kek)
            if any((w.kind, w.fingerprint) == (kind, kek.fingerprint) for w in wraps):
                continue
            if isinstance(kek, Recipient):
                wraps.append(wrap_for_recipient(data_key, kek))
            else:
                wraps.append(wrap_for_key(data_key, kek))
            added += 1
        if len(wraps) > MAX_WRAPS:
            raise PipelineError(f"a backup's key may be wrapped for at most {MAX_WRAPS} keys")
        return dataclasses.replace(self, wraps=tuple(wraps)), added

    def without(self, wraps: Sequence[Wrap], *, where: str = "") -> Envelope:
        """This envelope without ``wraps``; refuses to remove the last one."""
        kept = tuple(w for w in self.wraps if w not in wraps)
        if not kept:
            suffix = f" ({where})" if where else ""
            raise PipelineError(
                "refusing to remove the last key this backup opens with "
                f"({self.accepted()}): nobody could restore it any more{suffix}"
            )
        return dataclasses.replace(self, wraps=kept)


class DataKey(Key):
    """A backup's data key together with its envelope; ``describe`` gives the key block."""

    __slots__ = ("envelope",)

    def __init__(self, material: bytes, envelope: Envelope | None = None) -> None:
        super().__init__(material, origin="data key")
        self.envelope = envelope

    def describe(self) -> dict[str, object]:
        if self.envelope is None:
            raise PipelineError("a data key has no envelope yet: wrap it for a key first")
        return self.envelope.to_dict()


def new_data_key(keks: Sequence[Key | Recipient]) -> DataKey:
    """A fresh random data key wrapped for every KEK (at least one)."""
    if not keks:
        raise KeyMissingError("an encrypted backup needs a key or a recipient to wrap its key for")
    key = DataKey(secrets.token_bytes(KEY_SIZE))
    empty = Envelope(data_key=key.fingerprint, wraps=())
    key.envelope = empty.added(key, keks)[0]
    return key


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyMissingError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise PipelineError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def load_recipient(path: str | os.PathLike[str]) -> Recipient:
    """The X25519 public key in ``path`` (PEM SubjectPublicKeyInfo)."""
    target = Path(path)
    data = _read(target, "public key file")
    return _parse_public(data, target)


def _parse_public(data: bytes, path: Path) -> Recipient:
    origin = f"public key file {path}"
    if _PEM_PRIVATE in data:
        raise PipelineError(
            f"{path} holds a private key; give its public key (vdistream key generate writes both)"
        )
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"{path} does not hold an X25519 public key (PEM)") from exc
    if not isinstance(public, X25519PublicKey):
        raise PipelineError(f"{path} holds a public key that is not X25519")
    raw = _raw_public(public)
    if _shared(X25519PrivateKey.generate(), raw) is None:
        raise PipelineError(
            f"{path} holds an X25519 public key of low order, which no private key matches"
        )
    return Recipient(raw, origin=origin)


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """The X25519 private key in ``path`` (PEM PKCS#8, unencrypted)."""
    target = Path(path)
    data = _read(target, "private key file")
    return _parse_private(data, target)


def _parse_private(data: bytes, path: Path) -> Identity:
    if _PEM_ENCRYPTED in data:
        raise PipelineError(
            f"{path} holds a passphrase-protected private key; vdistream reads an "
            "unprotected one (PKCS#8 PEM, as `vdistream key generate` writes): keep it "
            "mode 0600 where only restores can read it"
        )
    if _PEM_PUBLIC in data and _PEM_PRIVATE not in data:
        raise PipelineError(
            f"{path} holds a public key, which can encrypt but never decrypt: give the "
            "private key of one of the backup's recipients"
        )
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # never quote the content: it may be a secret in the wrong format
        raise PipelineError(f"{path} does not hold an X25519 private key (PEM)") from exc
    if not isinstance(private, X25519PrivateKey):
        raise PipelineError(f"{path} holds a private key that is not X25519")
    return Identity(private, origin=f"private key file {path}")


def read_key_or_recipient(path: str | os.PathLike[str]) -> Key | Recipient | Identity:
    """Whatever key file ``path`` holds: a symmetric key, a public key or a private key
    (PEM is told by its label). For the ``key`` commands' ``--old``/``--new``."""
    target = Path(path)
    data = _read(target, "key file")
    if _PEM_PRIVATE in data or _PEM_ENCRYPTED in data:
        return _parse_private(data, target)
    if _PEM_PUBLIC in data:
        return _parse_public(data, target)
    from vdistream.pipeline.keys import load_key

    return load_key(key_file=target)


def generate_identity(
    private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]
) -> Identity:
    """A new X25519 key pair: the private key to ``private_path`` (PEM PKCS#8, mode
    0600), the public key to ``public_path`` (PEM, mode 0644). Neither file may exist:
    nothing is overwritten (an existing private key may be the only copy of a key that
    backups need); on failure nothing is left."""
    private_target, public_target = Path(private_path), Path(public_path)
    if private_target.resolve() == public_target.resolve():
        raise PipelineError("the private and the public key need two different files")
    for target in (private_target, public_target):
        if target.exists() or target.is_symlink():
            raise PipelineError(f"{target} already exists; not overwriting it")
    private = X25519PrivateKey.generate()
    identity = Identity(private, origin=f"private key file {private_target}")
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_new_file(private_target, private_pem, 0o600)
    try:
        write_new_file(public_target, public_pem, 0o644)
    except BaseException:
        private_target.unlink(missing_ok=True)
        raise
    return identity
