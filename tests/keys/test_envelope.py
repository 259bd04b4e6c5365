"""The envelope itself: wraps of each kind open with their key only, are bound to their
place, and key files are read and written safely (real crypto, real files)."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.keys.conftest import vdistream
from vdistream.errors import KeyMissingError, PipelineError, WrongKeyError
from vdistream.pipeline.envelope import (
    Envelope,
    Passphrase,
    generate_identity,
    load_identity,
    load_recipient,
    new_data_key,
    read_key_or_recipient,
)
from vdistream.pipeline.keys import Key, ScryptParams, load_key

WRONG = "the key does not match the one this backup was encrypted with"


def test_each_kind_opens_with_its_own_key_only(tmp_path: Path) -> None:
    key = Key.generate()
    passphrase = Passphrase("a long passphrase")
    identity = generate_identity(tmp_path / "id.pem", tmp_path / "id.pub")
    data_key = new_data_key([key, passphrase.new_key(), load_recipient(tmp_path / "id.pub")])
    assert data_key.envelope is not None
    block = data_key.describe()
    assert [w["type"] for w in block["wrapped"]] == ["key", "passphrase", "x25519"]
    assert data_key.reveal().hex() not in repr(block)
    envelope = Envelope.parse(block)
    assert envelope is not None
    for opener in (key, Passphrase("a long passphrase"), load_identity(tmp_path / "id.pem")):
        assert envelope.open(opener) == data_key
    assert identity.fingerprint == envelope.wraps[2].fingerprint
    other = generate_identity(tmp_path / "other.pem", tmp_path / "other.pub")
    for wrong in (Key.generate(), Passphrase("another passphrase"), other):
        with pytest.raises(WrongKeyError, match=WRONG):
            envelope.open(wrong, where="b1")


def test_a_wrap_is_bound_to_its_data_key_and_place() -> None:
    key = Key.generate()
    first, second = new_data_key([key]), new_data_key([key])
    assert first.envelope is not None
    assert second.envelope is not None
    # the wrap of another backup's data key, moved into this one's block
    moved = dataclasses.replace(first.envelope, wraps=second.envelope.wraps)
    with pytest.raises(PipelineError, match="fails authentication"):
        moved.open(key)
    wrap = first.envelope.wraps[0]
    flipped = bytes([wrap.wrapped[0] ^ 1]) + wrap.wrapped[1:]
    damaged = dataclasses.replace(
        first.envelope, wraps=(dataclasses.replace(wrap, wrapped=flipped),)
    )
    with pytest.raises(PipelineError, match="damaged"):
        damaged.open(key)


def test_malformed_blocks_are_refused() -> None:
    assert Envelope.parse({"fingerprint": "00" * 16, "kdf": None}) is None  # pre-envelope
    with pytest.raises(PipelineError, match="envelope version 2"):
        Envelope.parse({"envelope": 2, "data_key": "", "wrapped": []})
    with pytest.raises(PipelineError, match=r"1\.\.64 wraps"):
        Envelope.parse({"envelope": 1, "data_key": "", "wrapped": []})
    with pytest.raises(PipelineError, match="unknown kind"):
        Envelope.parse({"envelope": 1, "data_key": "", "wrapped": [{"type": "rsa"}]})


def test_key_files_are_told_apart(tmp_path: Path) -> None:
    generate_identity(tmp_path / "id.pem", tmp_path / "id.pub")
    (tmp_path / "sym.key").write_text("ab" * 32)
    assert type(read_key_or_recipient(tmp_path / "sym.key")).__name__ == "Key"
    assert type(read_key_or_recipient(tmp_path / "id.pub")).__name__ == "Recipient"
    assert type(read_key_or_recipient(tmp_path / "id.pem")).__name__ == "Identity"
    with pytest.raises(PipelineError, match="holds a private key; give its public key"):
        load_recipient(tmp_path / "id.pem")
    with pytest.raises(PipelineError, match="can encrypt but never decrypt"):
        load_identity(tmp_path / "id.pub")
    with pytest.raises(KeyMissingError, match="does not exist"):
        load_identity(tmp_path / "missing.pem")
    secret = tmp_path / "id.pem"
    assert secret.read_text() not in repr(load_identity(secret))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_openssl_made_keys_work(tmp_path: Path) -> None:
    private, public = tmp_path / "ossl.pem", tmp_path / "ossl.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "X25519", "-out", str(private)], check=True)
    subprocess.run(
        ["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True
    )
    data_key = new_data_key([load_recipient(public)])
    assert data_key.envelope is not None
    assert data_key.envelope.open(load_identity(private)) == data_key


def test_passphrase_derives_once_per_salt() -> None:
    passphrase = Passphrase("derive me once")
    params = ScryptParams.new()
    assert passphrase.key_for(params) is passphrase.key_for(params)
    assert passphrase.key_for(params) == load_key(passphrase="derive me once", kdf=params)
    assert "derive me" not in repr(passphrase)
    with pytest.raises(TypeError):
        pickle.dumps(passphrase)


def test_generate_never_overwrites(tmp_path: Path) -> None:
    identity = tmp_path / "id.pem"
    vdistream("key", "generate", str(identity))
    first = identity.read_bytes()
    refused = vdistream("key", "generate", str(identity), check=1)
    assert refused.stderr == f"vdistream: error: {identity} already exists; not overwriting it\n"
    assert identity.read_bytes() == first
    usage = vdistream("key", "rotate", str(tmp_path), "--new", str(identity), check=2)
    assert "give the old key" in usage.stderr
