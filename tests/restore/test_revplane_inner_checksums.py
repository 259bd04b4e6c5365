"""Transformed streams carry no logical SHA-256 of their own any more: what catches a
damaged byte once the stored SHA-256 has been fixed up to match it (a copy that
"repaired" the manifest, a bug that hashed after the damage) is the inner check alone:
zstd's frame checksum (XXH64), lz4's content checksum (XXH32), the AEAD tags. Each test
flips one byte in the middle of a stored stream, rewrites the manifest's stored
SHA-256 (and its own checksum) to match the damaged bytes, and expects restore and
verify to fail on the stream."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest

from tests.restore.conftest import SMALL, streams
from vdistream.catalog.manifest import Manifest
from vdistream.errors import PipelineError
from vdistream.operations import BackupSettings, KeySource, run_backup, run_restore, run_verify
from vdistream.pipeline.spec import parse_compression

pytestmark = pytest.mark.asyncio

# incompressible: zstd stores raw blocks and lz4 uncompressed blocks, so a flipped byte
# still decodes (to the wrong byte): only the frame's checksum can tell
DATA = os.urandom(1_500_000)

CASES = [
    ("zstd:1", False, "doesn't match checksum"),
    ("lz4", False, "contentChecksum_invalid"),
    ("none", True, "fails authentication"),
    ("zstd:1", True, "fails authentication"),
]


async def _backup(tmp_path: Path, compress: str, keys: KeySource | None) -> Path:
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)
    dest = tmp_path / "dest"
    outcome = await run_backup(
        f"cmd:cat {source}",
        str(dest),
        BackupSettings(
            devices=2,
            backup_id="b",
            compression=parse_compression(compress),
            encryption=keys,
            block_size=SMALL["block_size"],
            max_transfer_size=SMALL["max_transfer_size"],
        ),
    )
    assert outcome.ok, outcome.result.error
    return dest


def _damage_and_cover_up(dest: Path, device: int) -> None:
    """Flip a byte in the middle of ``device``'s stream and make the manifest agree."""
    path = streams(dest, "b")[device]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    manifest_path = dest / "b" / "manifest.json"
    manifest = Manifest.from_json(manifest_path.read_bytes(), where="test")
    assert (manifest.pipeline or {}).get("logical_digest", "absent") is None  # new format
    devices = tuple(
        dataclasses.replace(d, sha256=hashlib.sha256(data).hexdigest()) if d.index == device else d
        for d in manifest.devices
    )
    manifest_path.write_bytes(dataclasses.replace(manifest, devices=devices).to_json())


@pytest.mark.parametrize(("compress", "encrypted", "caught_by"), CASES)
async def test_only_the_inner_checksum_can_catch_a_flipped_byte(
    tmp_path: Path, compress: str, encrypted: bool, caught_by: str, key_file: Path
) -> None:
    keys = KeySource(key_file=str(key_file)) if encrypted else None
    dest = await _backup(tmp_path, compress, keys)
    sound = await run_verify(f"{dest}/b", content=False, keys=keys)
    assert sound.ok, sound.checks
    # the report says what checked the decoded bytes, not a logical SHA-256 never taken
    detail = next(c.detail for c in sound.checks if c.name == "device 0")
    assert "both SHA-256" not in detail
    assert "stored SHA-256 matches" in detail
    assert ("every segment authenticated" in detail) is encrypted
    assert ("frame checksum verified" in detail) is (compress != "none")

    _damage_and_cover_up(dest, 1)
    report = await run_verify(f"{dest}/b", content=False, keys=keys)
    assert not report.ok
    failed = [c for c in report.checks if not c.ok]
    assert [c.name for c in failed] == ["device 1"], report.checks
    assert caught_by in failed[0].detail

    out = tmp_path / "out.bin"
    result = await run_restore(f"{dest}/b", f"cmd:dd of={out} status=none", keys=keys)
    assert not result.ok
    assert isinstance(result.error, PipelineError), result.error
    assert "device 1" in str(result.error)
    assert caught_by in str(result.error)
