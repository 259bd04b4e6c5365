"""Backups made before envelope encryption (tests/keys/legacy, written by commit 790201c)
still restore with their key, refuse wrong or missing keys as before, and can be
rotated: the new key opens them, and (their streams being encrypted with the old key
itself) so does the old one, which the report says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.keys.conftest import restore, sha256, streams, vdistream, without_key_block
from vdistream.errors import KeyMissingError, WrongKeyError
from vdistream.operations import KeySource
from vdistream.pipeline.keys import generate_key_file

pytestmark = pytest.mark.asyncio

FIXTURE = Path(__file__).parent / "legacy"
SOURCE_SHA256 = "c8c132fb5d6ef3a23bf006b037dffc72111bb4cac68dd491b9fba9480596aab2"
PASSPHRASE = "legacy passphrase 16"
WRONG = "the key does not match the one this backup was encrypted with"


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    dest = tmp_path / "dest"
    shutil.copytree(FIXTURE / "dest", dest)
    shutil.copy(FIXTURE / "legacy.key", tmp_path / "legacy.key")
    return dest


async def test_old_backups_restore_with_their_key(
    tmp_path: Path, legacy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = KeySource(key_file=str(tmp_path / "legacy.key"))
    data = await restore(f"{legacy}/legacy-keyfile", key, tmp_path / "o")
    assert sha256(data) == SOURCE_SHA256
    monkeypatch.setenv("LEGACY_PASSPHRASE", PASSPHRASE)
    phrase = KeySource(passphrase_env="LEGACY_PASSPHRASE")
    data = await restore(f"{legacy}/legacy-passphrase", phrase, tmp_path / "o")
    assert sha256(data) == SOURCE_SHA256

    other = tmp_path / "other.key"
    generate_key_file(other)
    with pytest.raises(WrongKeyError, match=WRONG):
        await restore(f"{legacy}/legacy-keyfile", KeySource(key_file=str(other)), tmp_path / "o")
    with pytest.raises(KeyMissingError, match="is encrypted: give its key"):
        await restore(f"{legacy}/legacy-keyfile", None, tmp_path / "o")
    identity = tmp_path / "id.pem"
    vdistream("key", "generate", str(identity))
    with pytest.raises(KeyMissingError, match="made before envelope encryption"):
        await restore(
            f"{legacy}/legacy-keyfile", KeySource(identity_file=str(identity)), tmp_path / "o"
        )


async def test_rotating_an_old_backup(tmp_path: Path, legacy: Path) -> None:
    old = tmp_path / "legacy.key"
    new = tmp_path / "new.key"
    generate_key_file(new)
    before = streams(legacy, "legacy-keyfile")
    kept = without_key_block(legacy / "legacy-keyfile" / "manifest.json")
    done = vdistream(
        "key",
        "rotate",
        str(legacy),
        "--old",
        str(old),
        "--new",
        str(new),
        "--backup",
        "legacy-keyfile",
        "--json",
    )
    report = json.loads(done.stdout)
    assert report["changed"] == report["legacy"] == ["legacy-keyfile"]
    assert streams(legacy, "legacy-keyfile") == before
    assert without_key_block(legacy / "legacy-keyfile" / "manifest.json") == kept
    for key in (new, old):  # the old key is the streams' key: it still opens them
        data = await restore(
            f"{legacy}/legacy-keyfile", KeySource(key_file=str(key)), tmp_path / "o"
        )
        assert sha256(data) == SOURCE_SHA256
    listed = json.loads(vdistream("key", "list", str(legacy), "--json").stdout)["backups"]
    assert {row["id"]: row["format"] for row in listed} == {
        "legacy-keyfile": "envelope (legacy key)",
        "legacy-passphrase": "pre-envelope",
    }
    again = ("key", "rotate", str(legacy), "--old", str(old), "--new", str(new))
    assert "already rotated" in vdistream(*again, "--backup", "legacy-keyfile").stdout
    # the passphrase backup does not open with that key: it fails, alone, and says why
    refused = vdistream(*again, check=1).stderr
    assert f"backup legacy-passphrase: {WRONG}" in refused
