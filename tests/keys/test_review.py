"""What the review of the key commands found: a backup being written while keys are
rotated, a passphrase rotated to itself, a low-order X25519 public key, malformed or
hostile scrypt parameters, a manifest with fields this version does not know, and the
key of a backup made before envelopes given to ``key remove``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from tests.keys.conftest import SMALL, restore, sha256, vdistream
from vdistream.catalog import CatalogError, read_manifest
from vdistream.catalog.store import replace_manifest
from vdistream.errors import PipelineError, WrongKeyError
from vdistream.operations import BackupSettings, KeySource, run_backup
from vdistream.pipeline.envelope import Envelope
from vdistream.pipeline.keys import ScryptParams, generate_key_file
from vdistream.storage.file import FileStorage

pytestmark = pytest.mark.asyncio

WRONG = "the key does not match the one this backup was encrypted with"
LEGACY = Path(__file__).parent / "legacy"


def keyfile(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    generate_key_file(path)
    return path


async def test_a_backup_being_written_is_reported_and_rotated_by_the_rerun(
    tmp_path: Path, source: Path
) -> None:
    old, new = keyfile(tmp_path, "old.key"), keyfile(tmp_path, "new.key")
    dest = tmp_path / "dest"
    rotate = ("key", "rotate", str(dest), "--old", str(old), "--new", str(new))
    lock = dest / "slow" / ".vdistream-owner.lock"
    go = tmp_path / "go"
    results = []

    async def slow_backup() -> None:
        outcome = await run_backup(
            # writes once the test says so (bounded: 60 s), so it is surely running
            # while the rotation runs, however loaded the machine
            f"cmd:sh -c 'i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.05; "
            f"i=$((i+1)); done; cat {source}'",
            str(dest),
            BackupSettings(
                devices=2, encryption=KeySource(key_file=str(old)), backup_id="slow", **SMALL
            ),
        )
        results.append(outcome.ok)

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_backup)
        with anyio.fail_after(60):
            while not await anyio.Path(lock).exists():  # noqa: ASYNC110 (another job's file)
                await anyio.sleep(0.05)
        done = await anyio.to_thread.run_sync(lambda: vdistream(*rotate, "--json", check=1))
        await anyio.Path(go).touch()
    assert results == [True]
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert report["changed"] == []
    assert [r["id"] for r in report["running"]] == ["slow"]
    owner = report["running"][0]["owner"]
    assert done.stderr == (
        f"vdistream: backup slow is being written ({owner}): it keeps the keys its job was "
        "given; run `vdistream key rotate` again once it has finished\n"
    )
    # the backup committed with the old key only: the rerun rotates it
    again = json.loads(vdistream(*rotate, "--json").stdout)
    assert again["changed"] == ["slow"]
    with pytest.raises(WrongKeyError, match=WRONG):
        await restore(f"{dest}/slow", KeySource(key_file=str(old)), tmp_path / "o")
    data = await restore(f"{dest}/slow", KeySource(key_file=str(new)), tmp_path / "o")
    assert sha256(data) == sha256(await anyio.Path(source).read_bytes())


async def test_rotating_a_passphrase_to_itself_adds_no_wrap(tmp_path: Path, source: Path) -> None:
    from tests.keys.conftest import backup

    env = {"PHRASE": "the same passphrase, twice"}
    dest = tmp_path / "dest"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PHRASE", env["PHRASE"])
        await backup(source, str(dest), KeySource(passphrase_env="PHRASE"), "b1")
    before = (dest / "b1" / "manifest.json").read_bytes()
    args = ("key", "rotate", str(dest), "--old-passphrase-env", "PHRASE")
    for _ in range(3):
        done = vdistream(*args, "--new-passphrase-env", "PHRASE", env=env)
        assert done.stdout == f"rotated 0 backups; 1 already rotated in {dest}\n"
    assert (dest / "b1" / "manifest.json").read_bytes() == before
    # key add of that passphrase and a new key: only the new key is added
    other = keyfile(tmp_path, "other.key")
    add = ("key", "add", str(dest), "--passphrase-env", "PHRASE", "--new", str(other))
    vdistream(*add, "--new-passphrase-env", "PHRASE", env=env)
    block = json.loads((dest / "b1" / "manifest.json").read_text())["pipeline"]["encryption"]
    assert [w["type"] for w in block["key"]["wrapped"]] == ["passphrase", "key"]


async def test_a_low_order_public_key_is_refused_in_one_line(tmp_path: Path) -> None:
    zero = tmp_path / "zero.pub"
    zero.write_bytes(
        X25519PublicKey.from_public_bytes(bytes(32)).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 1000)
    dest = tmp_path / "dest"
    expected = (
        f"vdistream: error: {zero} holds an X25519 public key of low order, which no private "
        "key matches\n"
    )
    done = vdistream(
        "backup", f"cmd:cat {source}", str(dest), "--encrypt-recipient", str(zero), check=1
    )
    assert done.stderr == expected
    key = keyfile(tmp_path, "k.key")
    await _backup_with(source, dest, KeySource(key_file=str(key)), "b1")
    before = (dest / "b1" / "manifest.json").read_bytes()
    done = vdistream("key", "add", str(dest), "--key", str(key), "--recipient", str(zero), check=1)
    assert done.stderr == expected
    assert (dest / "b1" / "manifest.json").read_bytes() == before


async def _backup_with(source: Path, dest: Path, keys: KeySource, backup_id: str) -> None:
    from tests.keys.conftest import backup

    await backup(source, str(dest), keys, backup_id)


def _wrap(kdf: object) -> dict[str, object]:
    return {
        "envelope": 1,
        "data_key": "00" * 16,
        "wrapped": [
            {
                "type": "passphrase",
                "fingerprint": "00" * 16,
                "nonce": "00" * 12,
                "wrapped": "00" * 48,
                "kdf": kdf,
            }
        ],
    }


async def test_malformed_or_hostile_scrypt_parameters_are_clear_errors() -> None:
    for kdf in ([1, 2], "scrypt", None):
        with pytest.raises(
            PipelineError,
            match=r"^malformed passphrase wrap in the manifest: its kdf is not an object$",
        ):
            Envelope.parse(_wrap(kdf))
    for kdf in ([1, 2], "scrypt"):  # a pre-envelope block's kdf
        with pytest.raises(
            PipelineError, match=r"^malformed scrypt parameters in the manifest: not an object$"
        ):
            ScryptParams.from_dict(kdf)  # type: ignore[arg-type]
    salt = "11" * 16
    hostile = {"name": "scrypt", "salt": salt, "n": 2**22, "r": 32, "p": 1}
    with pytest.raises(
        PipelineError,
        match=r"^scrypt n=4194304, r=32 needs 16384 MiB of memory; at most 1024 MiB is allowed$",
    ):
        Envelope.parse(_wrap(hostile))
    assert ScryptParams(salt=bytes(16), n=2**20, r=8).n == 2**20  # 1 GiB: still allowed
    Envelope.parse(_wrap({"name": "scrypt", "salt": salt, "n": 2**15, "r": 8, "p": 1}))


def _rechecksum(path: Path, change: dict[str, object]) -> None:
    """Add ``change`` to the manifest and give it a matching checksum (a newer writer)."""
    body = json.loads(path.read_text())
    body.pop("checksum")
    body.update(change)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["checksum"] = hashlib.sha256(canonical).hexdigest()
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


async def test_a_manifest_with_unknown_fields_is_not_rewritten(
    tmp_path: Path, source: Path
) -> None:
    old, new = keyfile(tmp_path, "old.key"), keyfile(tmp_path, "new.key")
    dest = tmp_path / "dest"
    for backup_id in ("b1", "b2"):
        await _backup_with(source, dest, KeySource(key_file=str(old)), backup_id)
    manifest = dest / "b1" / "manifest.json"
    _rechecksum(manifest, {"retention_lock": {"until": "2030-01-01"}})
    await read_manifest(FileStorage(dest), "b1")  # valid: its checksum matches
    before = manifest.read_bytes()
    done = vdistream("key", "rotate", str(dest), "--old", str(old), "--new", str(new), check=1)
    assert done.stderr == (
        f"vdistream: backup b1: manifest {manifest.as_uri()} holds fields this vdistream "
        "does not know (a newer version wrote it): not rewriting it; use that version\n"
    )
    assert done.stdout == f"rotated 1 backup; 1 failed in {dest}\n"
    assert manifest.read_bytes() == before
    # replace_manifest itself changes the key block and nothing else
    storage = FileStorage(dest)
    b2 = await read_manifest(storage, "b2")
    import dataclasses

    with pytest.raises(CatalogError, match="differs in more than its key"):
        await replace_manifest(storage, dataclasses.replace(b2, source="elsewhere"))
    assert (await read_manifest(storage, "b2")) == b2


async def test_key_remove_of_an_old_backups_own_key_fails(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    shutil.copytree(LEGACY / "dest", dest)
    old = tmp_path / "legacy.key"
    shutil.copy(LEGACY / "legacy.key", old)
    new = keyfile(tmp_path, "new.key")
    fingerprint = "5edaf3e042d0f292b77902eb1bf505c3"
    line = (
        "made before envelope encryption: its streams are encrypted with key "
        f"{fingerprint} itself, which therefore cannot be removed from it (only a new "
        "backup is beyond it)"
    )
    # not converted yet: the key is not wrapped, and it cannot be removed either
    done = vdistream(
        "key", "remove", str(dest), "--old", str(old), "--backup", "legacy-keyfile", check=1
    )
    assert done.stderr == f"vdistream: backup legacy-keyfile: {line}\n"
    vdistream(
        "key", "rotate", str(dest), "--old", str(old), "--new", str(new), "--backup",
        "legacy-keyfile",
    )  # fmt: skip
    before = (dest / "legacy-keyfile" / "manifest.json").read_bytes()
    for how in (("--old", str(old)), ("--fingerprint", fingerprint)):
        done = vdistream("key", "remove", str(dest), *how, "--backup", "legacy-keyfile", check=1)
        assert done.stderr == f"vdistream: backup legacy-keyfile: {line}\n"
    assert (dest / "legacy-keyfile" / "manifest.json").read_bytes() == before


async def test_a_passphrase_protected_private_key_is_named_as_such(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from vdistream.pipeline.envelope import load_identity, read_key_or_recipient

    protected = tmp_path / "protected.pem"
    protected.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    message = (
        f"^{protected} holds a passphrase-protected private key; vdistream reads an unprotected one"
    )
    for read in (load_identity, read_key_or_recipient):
        with pytest.raises(PipelineError, match=message):
            read(protected)


async def test_an_empty_passphrase_variable_is_named(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vdistream.errors import KeyMissingError

    monkeypatch.setenv("PHRASE", "a passphrase")
    dest = tmp_path / "dest"
    await _backup_with(source, dest, KeySource(passphrase_env="PHRASE"), "b1")
    monkeypatch.setenv("PHRASE", "")
    with pytest.raises(
        KeyMissingError, match=r"^the environment variable PHRASE holds no passphrase$"
    ):
        await restore(f"{dest}/b1", KeySource(passphrase_env="PHRASE"), tmp_path / "o")


async def test_key_remove_of_an_old_backups_passphrase_fails(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    shutil.copytree(LEGACY / "dest", dest)
    before = (dest / "legacy-passphrase" / "manifest.json").read_bytes()
    done = vdistream(
        "key", "remove", str(dest), "--old-passphrase-env", "PHRASE", "--backup",
        "legacy-passphrase", check=1, env={"PHRASE": "legacy passphrase 16"},
    )  # fmt: skip
    assert done.stderr == (
        "vdistream: backup legacy-passphrase: made before envelope encryption: its streams "
        "are encrypted with key 9df0eb12f66e88b706e5dbc9b621e380 itself, which therefore "
        "cannot be removed from it (only a new backup is beyond it)\n"
    )
    assert (dest / "legacy-passphrase" / "manifest.json").read_bytes() == before
    # another passphrase has nothing to remove there
    other = vdistream(
        "key", "remove", str(dest), "--old-passphrase-env", "PHRASE", "--backup",
        "legacy-passphrase", env={"PHRASE": "another one"},
    )  # fmt: skip
    assert "1 made before envelope encryption: its key is not wrapped" in other.stdout
