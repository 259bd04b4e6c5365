"""Key sources, fingerprints, and that key material never shows up anywhere."""

from __future__ import annotations

import base64
import hashlib
import hmac
import pickle
import stat
from pathlib import Path

import pytest

from vdistream.errors import ConfigError, KeyMissingError, PipelineError, WrongKeyError
from vdistream.pipeline import Key, ScryptParams, generate_key_file, load_key

RAW = bytes(range(100, 132))
HEX = RAW.hex()
B64 = base64.b64encode(RAW).decode()


def _assert_hidden(text: str, key: Key) -> None:
    material = key.reveal()
    for form in (material.hex(), material.hex().upper(), base64.b64encode(material).decode()):
        assert form not in text
        assert form[:12] not in text
    assert repr(material) not in text


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(RAW, id="raw"),
        pytest.param(HEX.encode(), id="hex"),
        pytest.param(HEX.encode() + b"\n", id="hex with newline"),
        pytest.param(HEX.upper().encode(), id="upper-case hex"),
        pytest.param(f"  {HEX[:32]}\n{HEX[32:]}\r\n".encode(), id="hex split over lines"),
        pytest.param(B64.encode(), id="base64"),
        pytest.param(f"\n {B64} \n".encode(), id="base64 with spaces"),
    ],
)
def test_key_file_formats(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "backup.key"
    path.write_bytes(content)
    key = load_key(key_file=path)
    assert key.reveal() == RAW
    assert key.kdf is None
    assert str(path) in key.origin
    assert load_key(key_file=str(path)) == key


@pytest.mark.parametrize(
    "content",
    [
        b"",
        RAW[:31],
        RAW + b"\n",  # raw bytes must be exactly 32
        HEX[:62].encode(),
        ("zz" + HEX[2:]).encode(),
        base64.b64encode(RAW[:31]),
        b"correct horse battery staple, a passphrase is not a key file",
    ],
    ids=["empty", "31 raw", "33 raw", "62 hex", "not hex", "base64 of 31", "text"],
)
def test_malformed_key_files_are_refused_without_quoting_them(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "backup.key"
    path.write_bytes(content)
    with pytest.raises(PipelineError) as raised:
        load_key(key_file=path)
    message = str(raised.value)
    assert str(path) in message
    assert f"{len(content)} bytes" in message
    if len(content) > 4:
        for part in (content.decode("latin-1"), content[:8].decode("latin-1"), content.hex()):
            assert part not in message


def test_a_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyMissingError, match="does not exist") as raised:
        load_key(key_file=tmp_path / "nope.key")
    assert "nope.key" in str(raised.value)


def test_an_unreadable_key_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="cannot read key file") as raised:
        load_key(key_file=tmp_path)  # a directory
    assert str(tmp_path) in str(raised.value)


@pytest.mark.parametrize("value", [HEX, f" {HEX}\n", B64])
def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("VDISTREAM_TEST_KEY", value)
    key = load_key(env="VDISTREAM_TEST_KEY")
    assert key.reveal() == RAW
    assert "VDISTREAM_TEST_KEY" in key.origin


def test_environment_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VDISTREAM_TEST_KEY", raising=False)
    with pytest.raises(KeyMissingError, match="VDISTREAM_TEST_KEY is not set"):
        load_key(env="VDISTREAM_TEST_KEY")
    monkeypatch.setenv("VDISTREAM_TEST_KEY", "  ")
    with pytest.raises(KeyMissingError):
        load_key(env="VDISTREAM_TEST_KEY")
    secret = "hunter2-is-not-a-key-" + HEX[:20]
    monkeypatch.setenv("VDISTREAM_TEST_KEY", secret)
    with pytest.raises(PipelineError, match="VDISTREAM_TEST_KEY does not hold a key") as raised:
        load_key(env="VDISTREAM_TEST_KEY")
    assert "hunter2" not in str(raised.value)
    monkeypatch.setenv("VDISTREAM_TEST_KEY", RAW.decode("latin-1"))  # raw bytes: not here
    with pytest.raises(PipelineError):
        load_key(env="VDISTREAM_TEST_KEY")


def test_a_passphrase_key_is_rederived_from_its_recorded_salt() -> None:
    key = load_key(passphrase="correct horse battery staple")
    assert key.kdf is not None
    assert len(key.kdf.salt) == 16
    assert (key.kdf.n, key.kdf.r, key.kdf.p) == (2**15, 8, 1)
    # the documented parameters, checked against hashlib directly
    expected = hashlib.scrypt(
        b"correct horse battery staple",
        salt=key.kdf.salt,
        n=2**15,
        r=8,
        p=1,
        maxmem=64 << 20,
        dklen=32,
    )
    assert key.reveal() == expected
    again = load_key(passphrase="correct horse battery staple", salt=key.kdf.salt)
    assert again == key
    recorded = key.describe()
    assert recorded["fingerprint"] == key.fingerprint
    assert isinstance(recorded["kdf"], dict)
    params = ScryptParams.from_dict(recorded["kdf"])
    assert load_key(passphrase="correct horse battery staple", kdf=params) == key
    # another salt, another key; another passphrase, another key
    assert load_key(passphrase="correct horse battery staple") != key
    wrong = load_key(passphrase="Correct horse battery staple", salt=key.kdf.salt)
    assert wrong != key
    with pytest.raises(WrongKeyError, match="does not match"):
        wrong.check_fingerprint(key.fingerprint)
    key.check_fingerprint(key.fingerprint.upper())


def test_passphrases_are_unicode_normalised() -> None:
    salt = bytes(16)
    composed = load_key(passphrase="caf\u00e9", salt=salt)
    decomposed = load_key(passphrase="cafe\u0301", salt=salt)
    assert composed == decomposed


def test_key_source_mistakes(tmp_path: Path) -> None:
    with pytest.raises(KeyMissingError, match="no key given"):
        load_key()
    with pytest.raises(ConfigError, match="only one key source"):
        load_key(key_file=tmp_path / "k", passphrase="x")
    with pytest.raises(ConfigError, match="passphrase only"):
        load_key(env="X", salt=bytes(16))
    with pytest.raises(PipelineError, match="empty"):
        load_key(passphrase="")
    with pytest.raises(PipelineError, match=r"salt must be 16\.\.64 bytes"):
        load_key(passphrase="x", salt=b"short")


@pytest.mark.parametrize(
    "recorded",
    [
        {"name": "argon2", "n": 2, "r": 1, "p": 1, "salt": "00" * 16},
        {"name": "scrypt", "n": 2**15, "r": 8, "p": 1},
        {"name": "scrypt", "n": 2**15, "r": 8, "p": 1, "salt": "not hex"},
        {"name": "scrypt", "n": 1000, "r": 8, "p": 1, "salt": "00" * 16},
        {"name": "scrypt", "n": 2**30, "r": 8, "p": 1, "salt": "00" * 16},
        {"name": "scrypt", "n": "32768", "r": 8, "p": 1, "salt": "00" * 16},
        {"name": "scrypt", "n": 2**15, "r": 0, "p": 1, "salt": "00" * 16},
    ],
)
def test_malformed_recorded_kdf_parameters(recorded: dict[str, object]) -> None:
    with pytest.raises(PipelineError):
        ScryptParams.from_dict(recorded)


def test_repr_and_str_hide_the_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text(HEX)
    for key in (load_key(key_file=path), Key.generate(), load_key(passphrase="pw")):
        for text in (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr(key.describe())):
            _assert_hidden(text, key)
        assert key.fingerprint[:16] in repr(key)
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(key)


def test_the_fingerprint_is_domain_separated() -> None:
    key = Key(RAW)
    assert len(key.fingerprint) == 32
    assert key.fingerprint == Key(RAW).fingerprint
    assert key.fingerprint != Key(bytes(32)).fingerprint
    # not a plain hash of the key, which other tools might also publish
    assert key.fingerprint not in hashlib.sha256(RAW).hexdigest()
    label = b"vdistream/v1/key-fingerprint"
    assert key.fingerprint == hmac.new(RAW, label, hashlib.sha256).hexdigest()[:32]
    assert hash(key) == hash(Key(RAW))


def test_keys_must_be_32_bytes() -> None:
    with pytest.raises(PipelineError, match="32 bytes, got 16"):
        Key(bytes(16))


def test_generate_key_file(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    key = generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.reveal().hex() + "\n"
    assert load_key(key_file=path) == key
    with pytest.raises(PipelineError, match="already exists") as raised:
        generate_key_file(path)
    assert str(path) in str(raised.value)
    assert load_key(key_file=path) == key  # untouched
    assert generate_key_file(tmp_path / "other.key") != key
    with pytest.raises(PipelineError, match="cannot create key file"):
        generate_key_file(tmp_path / "missing-dir" / "k")
