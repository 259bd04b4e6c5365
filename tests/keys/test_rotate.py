"""Rotation, add and remove on a file destination, through the command line: only the
manifests' key blocks change; streams keep their bytes and mtimes."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from tests.keys.conftest import (
    backup,
    restore,
    sha256,
    streams,
    vdistream,
    without_key_block,
)
from vdistream.catalog import read_manifest
from vdistream.errors import KeyMissingError, WrongKeyError
from vdistream.operations import KeySource
from vdistream.pipeline.keys import generate_key_file
from vdistream.storage.file import FileStorage

pytestmark = pytest.mark.asyncio

WRONG = "the key does not match the one this backup was encrypted with"
PASSPHRASE = "rotate me, correct horse"


def keyfile(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    generate_key_file(path)
    return path


async def test_rotate_key_file_to_key_file(tmp_path: Path, source: Path) -> None:
    old, new = keyfile(tmp_path, "old.key"), keyfile(tmp_path, "new.key")
    dest = tmp_path / "dest"
    for backup_id in ("b1", "b2"):
        await backup(source, str(dest), KeySource(key_file=str(old)), backup_id, compress="zstd:1")
    before = {b: streams(dest, b) for b in ("b1", "b2")}
    kept = {b: without_key_block(dest / b / "manifest.json") for b in ("b1", "b2")}

    done = vdistream("key", "rotate", str(dest), "--old", str(old), "--new", str(new), "--json")
    report = json.loads(done.stdout)
    assert report["changed"] == ["b1", "b2"]
    assert report["ok"] is True

    for backup_id in ("b1", "b2"):
        assert streams(dest, backup_id) == before[backup_id]  # bytes and mtimes
        assert without_key_block(dest / backup_id / "manifest.json") == kept[backup_id]
        await read_manifest(FileStorage(dest), backup_id)  # its checksum matches
        with pytest.raises(WrongKeyError, match=WRONG):
            await restore(f"{dest}/{backup_id}", KeySource(key_file=str(old)), tmp_path / "o")
        data = await restore(f"{dest}/{backup_id}", KeySource(key_file=str(new)), tmp_path / "o")
        assert sha256(data) == sha256(await anyio.Path(source).read_bytes())
    assert not list(dest.rglob("*.tmp"))

    # the old key refused by restore on the command line too: one line, exit 1
    refused = vdistream(
        "restore",
        f"{dest}/b1",
        f"cmd:cat > {tmp_path / 'x'}",
        "--encrypt-key-file",
        str(old),
        check=1,
    )
    assert refused.stderr.count("\n") == 1
    assert WRONG in refused.stderr
    assert "Traceback" not in refused.stderr

    # a rerun has nothing left to do
    again = json.loads(
        vdistream("key", "rotate", str(dest), "--old", str(old), "--new", str(new), "--json").stdout
    )
    assert again["changed"] == []
    assert [u["reason"] for u in again["unchanged"]] == ["already rotated"] * 2


async def test_rotate_passphrase_to_key_file(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLD_PASSPHRASE", PASSPHRASE)
    new = keyfile(tmp_path, "new.key")
    dest = tmp_path / "dest"
    await backup(source, str(dest), KeySource(passphrase_env="OLD_PASSPHRASE"), "b1")
    assert PASSPHRASE not in (dest / "b1" / "manifest.json").read_text()
    before = streams(dest, "b1")
    vdistream(
        "key", "rotate", str(dest), "--old-passphrase-env", "OLD_PASSPHRASE", "--new", str(new)
    )
    assert streams(dest, "b1") == before
    with pytest.raises(WrongKeyError, match=WRONG):
        await restore(f"{dest}/b1", KeySource(passphrase_env="OLD_PASSPHRASE"), tmp_path / "o")
    data = await restore(f"{dest}/b1", KeySource(key_file=str(new)), tmp_path / "o")
    assert sha256(data) == sha256(await anyio.Path(source).read_bytes())


async def test_rotate_with_the_wrong_old_key_changes_nothing(tmp_path: Path, source: Path) -> None:
    key, other, new = (keyfile(tmp_path, n) for n in ("a.key", "other.key", "new.key"))
    dest = tmp_path / "dest"
    await backup(source, str(dest), KeySource(key_file=str(key)), "b1")
    manifest = (dest / "b1" / "manifest.json").read_bytes()
    done = vdistream("key", "rotate", str(dest), "--old", str(other), "--new", str(new), check=1)
    assert f"backup b1: {WRONG}" in done.stderr
    assert (dest / "b1" / "manifest.json").read_bytes() == manifest


async def test_add_and_remove_recipients(tmp_path: Path, source: Path) -> None:
    key = keyfile(tmp_path, "a.key")
    identity = tmp_path / "ops.pem"
    made = json.loads(vdistream("key", "generate", str(identity), "--json").stdout)
    public = Path(made["public_key"])
    assert identity.stat().st_mode & 0o777 == 0o600
    dest = tmp_path / "dest"
    await backup(source, str(dest), KeySource(key_file=str(key)), "b1")
    before = streams(dest, "b1")
    original = sha256(await anyio.Path(source).read_bytes())

    vdistream("key", "add", str(dest), "--key", str(key), "--recipient", str(public))
    listed = json.loads(vdistream("key", "list", str(dest), "--json").stdout)["backups"]
    assert [k["type"] for k in listed[0]["keys"]] == ["key", "x25519"]
    assert listed[0]["keys"][1]["fingerprint"] == made["fingerprint"]
    for keys in (KeySource(key_file=str(key)), KeySource(identity_file=str(identity))):
        assert sha256(await restore(f"{dest}/b1", keys, tmp_path / "o")) == original

    vdistream("key", "remove", str(dest), "--old", str(key))
    with pytest.raises(WrongKeyError, match=WRONG):
        await restore(f"{dest}/b1", KeySource(key_file=str(key)), tmp_path / "o")
    assert (
        sha256(await restore(f"{dest}/b1", KeySource(identity_file=str(identity)), tmp_path / "o"))
        == original
    )

    # the last one stays: exit 1, one line naming the backup, nothing changed
    manifest = (dest / "b1" / "manifest.json").read_bytes()
    refused = vdistream("key", "remove", str(dest), "--fingerprint", made["fingerprint"], check=1)
    assert "backup b1: refusing to remove the last key this backup opens with" in refused.stderr
    assert (dest / "b1" / "manifest.json").read_bytes() == manifest
    assert streams(dest, "b1") == before


async def test_x25519_recipient_only(tmp_path: Path, source: Path) -> None:
    """The writer holds only the public key: it cannot read back what it wrote."""
    identity = tmp_path / "restore.pem"
    vdistream("key", "generate", str(identity))
    public = tmp_path / "restore.pem.pub"
    dest = tmp_path / "dest"
    await backup(source, str(dest), KeySource(recipients=(str(public),)), "b1")
    manifest = (dest / "b1" / "manifest.json").read_text()
    assert identity.read_text().splitlines()[1] not in manifest

    data = await restore(f"{dest}/b1", KeySource(identity_file=str(identity)), tmp_path / "o")
    assert sha256(data) == sha256(await anyio.Path(source).read_bytes())

    with pytest.raises(
        KeyMissingError, match=r"a public key \(--encrypt-recipient\) cannot decrypt it"
    ):
        await restore(f"{dest}/b1", KeySource(recipients=(str(public),)), tmp_path / "o")
    with pytest.raises(KeyMissingError, match="is encrypted: give its key"):
        await restore(f"{dest}/b1", None, tmp_path / "o")
    other = tmp_path / "other.pem"
    vdistream("key", "generate", str(other))
    with pytest.raises(WrongKeyError, match=WRONG):
        await restore(f"{dest}/b1", KeySource(identity_file=str(other)), tmp_path / "o")
    # a public key given where the private one belongs: said so
    with pytest.raises(Exception, match="holds a public key, which can encrypt but never decrypt"):
        await restore(f"{dest}/b1", KeySource(identity_file=str(public)), tmp_path / "o")


async def test_command_line_recipient_and_identity(tmp_path: Path, source: Path) -> None:
    """backup --encrypt-recipient on the writer, restore --decrypt-identity elsewhere."""
    identity = tmp_path / "restore.pem"
    vdistream("key", "generate", str(identity))
    dest = tmp_path / "dest"
    made = vdistream(
        "backup",
        f"cmd:cat {source}",
        str(dest),
        "--encrypt-recipient",
        f"{identity}.pub",
        "--json",
    )
    backup_id = json.loads(made.stdout)["id"]
    out = tmp_path / "out.bin"
    missing = vdistream("restore", f"{dest}/{backup_id}", f"cmd:cat > {out}", check=1)
    assert missing.stderr == (
        f"vdistream: error: backup {backup_id} is encrypted: give its key (--encrypt-key-file, "
        "--encrypt-key-env or --encrypt-passphrase-env) or the private key of one of its "
        "recipients (--decrypt-identity)\n"
    )
    vdistream(
        "restore",
        f"{dest}/{backup_id}",
        f"cmd:sh -c 'cat > {out}'",
        "--decrypt-identity",
        str(identity),
    )
    assert sha256(await anyio.Path(out).read_bytes()) == sha256(
        await anyio.Path(source).read_bytes()
    )
    verified = vdistream(
        "verify", f"{dest}/{backup_id}", "--decrypt-identity", str(identity), "--json"
    )
    assert json.loads(verified.stdout)["status"] == "verified"


async def test_unencrypted_backups_and_a_missing_destination(tmp_path: Path, source: Path) -> None:
    old, new = keyfile(tmp_path, "old.key"), keyfile(tmp_path, "new.key")
    dest = tmp_path / "dest"
    await backup(source, str(dest), None, "plain")
    manifest = (dest / "plain" / "manifest.json").read_bytes()
    report = json.loads(
        vdistream("key", "rotate", str(dest), "--old", str(old), "--new", str(new), "--json").stdout
    )
    assert report["unchanged"] == [{"id": "plain", "reason": "not encrypted"}]
    assert (dest / "plain" / "manifest.json").read_bytes() == manifest
    assert vdistream("key", "list", str(dest)).stdout == "plain  not encrypted\n"
    missing = vdistream("key", "list", str(tmp_path / "nowhere"), check=1)
    assert missing.stderr == f"vdistream: error: {tmp_path / 'nowhere'}: no such directory\n"
