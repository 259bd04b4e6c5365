"""Encryption keys: where they come from, and what may be written down about them.

A ``Key`` is 32 secret bytes (AES-256). Since envelope encryption
(``vdistream.pipeline.envelope``) the keys users hold are *key-encryption keys*: each
backup's streams are encrypted with its own random data key, which the manifest keeps
wrapped for them. Backups made before that were encrypted with the user's key itself
and still open with it (``describe`` and ``check_fingerprint`` below are theirs).
``load_key`` takes exactly one source:

* ``key_file``: a file holding the key as 32 raw bytes, 64 hex digits, or the base64
  of 32 bytes (surrounding whitespace ignored for the text forms). ``generate_key_file``
  writes a new random key as hex, mode 0600, and refuses to overwrite a file.
* ``env``: the *name* of an environment variable holding the key as hex or base64.
* ``passphrase``: stretched with scrypt (RFC 7914) at ``n=2**15, r=8, p=1``, 32-byte
  output, about 32 MiB and 0.1 s of work per derivation. At backup time ``salt`` is
  None and a random 16-byte salt is drawn; the backup's manifest records the
  parameters and the salt (``Key.describe()["kdf"]``), and restore passes them back
  (``load_key(passphrase=..., salt=...)`` or ``ScryptParams.from_dict``). The passphrase
  is NFC-normalised and UTF-8 encoded first, so the same text typed on another system
  gives the same key.

Nothing here ever puts key material, a passphrase or a key file's content in a message,
a ``repr`` or a ``str``. What may be stored is the *fingerprint*: the first 16 bytes of
``HMAC-SHA256(key, "vdistream/v1/key-fingerprint")`` in hex. The label keeps it
unrelated to every other use of the key (the stream cipher derives its own subkeys with
HKDF and different labels), and a one-way PRF of a 256-bit key reveals nothing usable
about it. It lets restore say "wrong key" before reading any data. Note that for a
passphrase key it allows offline guessing at scrypt's cost per guess, which is exactly
what the encrypted stream's own key-check value already allows; choose passphrases
accordingly or use a key file.

``load_key`` is synchronous and a passphrase costs ~0.1 s of CPU: call it once per job,
from a worker thread if the event loop is busy.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import os
import secrets
import string
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, NoReturn

from vdistream.errors import ConfigError, KeyMissingError, PipelineError, WrongKeyError

if TYPE_CHECKING:
    from vdistream.pipeline.envelope import Recipient

__all__ = (
    "KEY_SIZE",
    "Key",
    "ScryptParams",
    "generate_key_file",
    "load_key",
    "load_public_key",
    "write_new_file",
)

KEY_SIZE: Final = 32
_FINGERPRINT_LABEL = b"vdistream/v1/key-fingerprint"
_FINGERPRINT_BYTES = 16
_HEX_DIGITS = frozenset(string.hexdigits)
_SCRYPT_MAX_MEMORY = 1 << 30


@dataclasses.dataclass(frozen=True)
class ScryptParams:
    """How a passphrase became a key; recorded in the manifest (nothing here is secret)."""

    salt: bytes
    n: int = 2**15
    r: int = 8
    p: int = 1

    NAME: ClassVar[str] = "scrypt"

    def __post_init__(self) -> None:
        # Bounds keep a damaged or hostile manifest from asking for absurd work.
        if not 16 <= len(self.salt) <= 64:
            raise PipelineError(f"scrypt salt must be 16..64 bytes, got {len(self.salt)}")
        if self.n < 2 or self.n & (self.n - 1) or self.n > 2**22:
            raise PipelineError(f"scrypt n must be a power of two up to 2**22, got {self.n}")
        if not 1 <= self.r <= 32 or not 1 <= self.p <= 16:
            raise PipelineError(f"scrypt r={self.r}, p={self.p} out of range (1..32, 1..16)")
        # n and r alone allow 16 GiB; one derivation may ask for 1 GiB at most (the
        # default needs 32 MiB), and an envelope may hold 64 passphrase wraps
        if 128 * self.r * self.n > _SCRYPT_MAX_MEMORY:
            raise PipelineError(
                f"scrypt n={self.n}, r={self.r} needs {128 * self.r * self.n >> 20} MiB of "
                f"memory; at most {_SCRYPT_MAX_MEMORY >> 20} MiB is allowed"
            )

    @classmethod
    def new(cls) -> ScryptParams:
        """The default parameters with a fresh random 16-byte salt (backup time)."""
        return cls(salt=secrets.token_bytes(16))

    def to_dict(self) -> dict[str, object]:
        return {"name": self.NAME, "n": self.n, "r": self.r, "p": self.p, "salt": self.salt.hex()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ScryptParams:
        """Parameters read back from a manifest; ``PipelineError`` if malformed."""
        if not isinstance(data, Mapping):  # JSON of any shape may come here
            raise PipelineError("malformed scrypt parameters in the manifest: not an object")
        if data.get("name") != cls.NAME:
            raise PipelineError(f"unknown key derivation {data.get('name')!r}; expected scrypt")
        try:
            salt = bytes.fromhex(str(data["salt"]))
            n, r, p = (data[name] for name in ("n", "r", "p"))
        except (KeyError, ValueError) as exc:
            raise PipelineError(f"malformed scrypt parameters in the manifest: {exc}") from exc
        numbers = [value for value in (n, r, p) if type(value) is int]
        if len(numbers) != 3:
            raise PipelineError("malformed scrypt parameters in the manifest: n, r, p not ints")
        return cls(salt=salt, n=numbers[0], r=numbers[1], p=numbers[2])

    def derive(self, passphrase: str) -> bytes:
        """The 32-byte key for ``passphrase`` (CPU- and memory-hard on purpose)."""
        secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
        # OpenSSL's default memory cap (32 MiB) is just below what n=2**15, r=8 needs.
        maxmem = 128 * self.r * (self.n + self.p + 2) + (1 << 20)
        return hashlib.scrypt(
            secret, salt=self.salt, n=self.n, r=self.r, p=self.p, maxmem=maxmem, dklen=KEY_SIZE
        )


class Key:
    """32 secret bytes; ``repr`` and ``str`` show only a fingerprint prefix.

    ``origin`` says where the key came from ("key file /etc/x.key", "environment
    variable X", "passphrase") for messages; ``kdf`` is set for passphrase keys.
    """

    __slots__ = ("_material", "kdf", "origin")

    def __init__(
        self, material: bytes, *, origin: str = "key", kdf: ScryptParams | None = None
    ) -> None:
        if len(material) != KEY_SIZE:
            raise PipelineError(f"{origin}: a key is {KEY_SIZE} bytes, got {len(material)}")
        self._material = bytes(material)
        self.origin = origin
        self.kdf = kdf

    @classmethod
    def generate(cls) -> Key:
        return cls(secrets.token_bytes(KEY_SIZE), origin="generated key")

    def reveal(self) -> bytes:
        """The raw key, for the cipher only: never log, print or store it."""
        return self._material

    @property
    def fingerprint(self) -> str:
        """32 hex digits identifying the key, safe to store (see the module docstring)."""
        mac = hmac.new(self._material, _FINGERPRINT_LABEL, hashlib.sha256).digest()
        return mac[:_FINGERPRINT_BYTES].hex()

    def describe(self) -> dict[str, object]:
        """What the manifest records: the fingerprint and, for a passphrase, the KDF."""
        return {
            "fingerprint": self.fingerprint,
            "kdf": None if self.kdf is None else self.kdf.to_dict(),
        }

    def check_fingerprint(self, expected: str, *, where: str = "") -> None:
        """``WrongKeyError`` unless this key has the recorded ``expected`` fingerprint."""
        if not hmac.compare_digest(self.fingerprint, expected.strip().lower()):
            suffix = f" ({where})" if where else ""
            raise WrongKeyError(
                f"the key does not match the one this backup was encrypted with: {self.origin} "
                f"has fingerprint {self.fingerprint}, the backup needs {expected}{suffix}"
            )

    def __repr__(self) -> str:
        return f"<Key {self.fingerprint[:16]} from {self.origin}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return hmac.compare_digest(self._material, other._material)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self) -> NoReturn:
        # Pickling would copy the secret somewhere we cannot see; refuse.
        raise TypeError("a Key cannot be pickled")


def _parse_text(text: bytes) -> bytes | None:
    """The 32-byte key in ``text`` as hex or base64 (whitespace stripped), else None."""
    stripped = b"".join(text.split())
    if len(stripped) == 2 * KEY_SIZE and all(chr(c) in _HEX_DIGITS for c in stripped):
        return bytes.fromhex(stripped.decode("ascii"))
    try:
        decoded = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if len(decoded) == KEY_SIZE else None


def _from_file(path: Path) -> Key:
    origin = f"key file {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyMissingError(f"{origin} does not exist") from exc
    except OSError as exc:
        raise PipelineError(f"cannot read {origin}: {exc.strerror or exc}") from exc
    # 32 bytes can only be the raw form: hex is 64 characters and base64 44.
    material = data if len(data) == KEY_SIZE else _parse_text(data)
    if material is None:
        # Never echo the content: it may be a key in the wrong format.
        raise PipelineError(
            f"{origin} holds {len(data)} bytes that are not a key: expected 32 raw bytes, "
            "64 hex digits or the base64 of 32 bytes"
        )
    return Key(material, origin=origin)


def _from_env(name: str) -> Key:
    origin = f"environment variable {name}"
    value = os.environ.get(name)
    if not value or not value.strip():
        raise KeyMissingError(f"{origin} is not set or empty")
    material = _parse_text(value.encode("utf-8", "replace"))
    if material is None:
        raise PipelineError(
            f"{origin} does not hold a key: expected 64 hex digits or the base64 of 32 bytes"
        )
    return Key(material, origin=origin)


def load_key(
    *,
    key_file: str | os.PathLike[str] | None = None,
    env: str | None = None,
    passphrase: str | None = None,
    salt: bytes | None = None,
    kdf: ScryptParams | None = None,
) -> Key:
    """The key from exactly one of ``key_file``, ``env`` (a variable's name), ``passphrase``.

    For a passphrase: ``kdf`` (from the manifest) or ``salt`` (with the default
    parameters) re-derives a recorded key; with neither, a new random salt is drawn.
    ``KeyMissingError`` if no source is given, the file does not exist or the variable
    is unset; ``PipelineError`` if the content is not a key (never quoting it);
    ``ConfigError`` if several sources are given.
    """
    given = [
        name
        for name, value in (("key_file", key_file), ("env", env), ("passphrase", passphrase))
        if value is not None
    ]
    if len(given) > 1:
        raise ConfigError(f"give only one key source, got {' and '.join(given)}")
    if (salt is not None or kdf is not None) and passphrase is None:
        raise ConfigError("salt and kdf apply to a passphrase only")
    if key_file is not None:
        return _from_file(Path(key_file))
    if env is not None:
        return _from_env(env)
    if passphrase is not None:
        if not passphrase:
            raise PipelineError("the passphrase is empty")
        if kdf is not None and salt is not None and salt != kdf.salt:
            raise ConfigError("salt and kdf.salt disagree")
        params = kdf or (ScryptParams(salt=salt) if salt is not None else ScryptParams.new())
        return Key(params.derive(passphrase), origin="passphrase", kdf=params)
    raise KeyMissingError("no key given: use a key file, an environment variable or a passphrase")


def generate_key_file(path: str | os.PathLike[str]) -> Key:
    """Write a new random key to ``path`` as 64 hex digits, mode 0600; never overwrites."""
    target = Path(path)
    key = Key(secrets.token_bytes(KEY_SIZE), origin=f"key file {target}")
    # an existing key file may be the only copy of a key that backups need
    write_new_file(target, key.reveal().hex().encode("ascii") + b"\n", 0o600, what="key file ")
    return key


def write_new_file(target: Path, data: bytes, mode: int, *, what: str = "") -> None:
    """Create ``target`` (never replacing a file, nor following a symlink) with exactly
    ``mode`` and ``data``, fsynced; a failed write leaves no file. ``what`` starts the
    name in the messages (``"key file "``)."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError as exc:
        raise PipelineError(f"{what}{target} already exists; not overwriting it") from exc
    except OSError as exc:
        raise PipelineError(f"cannot create {what}{target}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits, never added: make sure
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise PipelineError(f"cannot write {what}{target}: {exc.strerror or exc}") from exc
    os.close(fd)


def load_public_key(path: str | os.PathLike[str]) -> Recipient:
    """The X25519 public key (a backup's *recipient*) in ``path``, PEM; see
    ``vdistream.pipeline.envelope``. ``KeyMissingError`` if the file does not exist,
    ``PipelineError`` if it holds no X25519 public key (a private key included)."""
    from vdistream.pipeline.envelope import load_recipient

    return load_recipient(path)
