"""Mirrored backups at the edges the first tests missed: a cancellation (Ctrl-C,
SIGTERM: both cancel the command's scope) while the manifests are written, and a
mirror that is the destination under another name."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from tests.jobs.test_manifest_failure import ManifestRefusingStorage
from tests.s3.conftest import MotoServer
from tests.storage.test_file import files_under
from vdistream.catalog import MANIFEST_NAME
from vdistream.errors import ConfigError, StorageError, StorageExistsError
from vdistream.operations import BackupSettings, run_backup
from vdistream.storage import FileStorage
from vdistream.storage.file import FileSink
from vdistream.storage.mirror import MirrorStorage

pytestmark = pytest.mark.asyncio

SMALL = {"block_size": 4096, "max_transfer_size": 65536}


class SlowManifestStorage(FileStorage):
    """A real directory whose manifest write completes and then hangs (a slow store
    answering late), so that a cancellation arrives with the manifest committed."""

    def __init__(self, path: Path, reached: anyio.Event) -> None:
        super().__init__(path)
        self.reached = reached

    async def write_bytes(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        overwrite: bool = False,
        device: str | None = None,
    ) -> None:
        await super().write_bytes(key, data, overwrite=overwrite, device=device)
        if key.endswith(MANIFEST_NAME):
            self.reached.set()
            await anyio.sleep_forever()


@pytest.mark.parametrize("slow", ["destination", "mirror"])
async def test_a_cancellation_while_the_manifests_are_written_leaves_nothing(
    tmp_path: Path, slow: str
) -> None:
    """Every stream committed in both, the slow side's manifest committed, then the
    command is cancelled: neither destination keeps a manifest or a stream (without
    the take-back on cancellation the destination kept a complete backup and the
    mirror unmarked streams that no sweep removes)."""
    one, two = tmp_path / "one", tmp_path / "two"
    reached = anyio.Event()
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(300_000))
    dest: str | FileStorage = str(one)
    mirror: str | FileStorage = str(two)
    if slow == "destination":
        dest = SlowManifestStorage(one, reached)
    else:
        mirror = SlowManifestStorage(two, reached)
    cancelled = False
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:

            async def backup() -> None:
                nonlocal cancelled
                try:
                    await run_backup(
                        f"cmd:cat {source}",
                        dest,
                        BackupSettings(devices=2, backup_id="b", mirror=mirror, **SMALL),
                    )
                except anyio.get_cancelled_exc_class():
                    cancelled = True
                    raise

            tg.start_soon(backup)
            await reached.wait()
            tg.cancel_scope.cancel()
    assert cancelled
    assert files_under(one) == []
    assert files_under(two) == []


@pytest.mark.parametrize("disguise", ["symlink", "dotdot"])
async def test_the_mirror_cannot_be_the_destination_under_another_name(
    tmp_path: Path, disguise: str
) -> None:
    """A symlink to the destination, or a path through ``..``: the same directory,
    refused as such before anything is written (it used to fail later as 'being
    written by another process' naming this very process)."""
    one = tmp_path / "one"
    one.mkdir()
    if disguise == "symlink":
        (tmp_path / "link").symlink_to(one)
        mirror = str(tmp_path / "link")
        shown = (tmp_path / "link").as_uri()
    else:
        mirror = f"{one}/../one"
        shown = f"{one.as_uri()}/../one"
    with pytest.raises(ConfigError) as caught:
        await run_backup(
            "cmd:head -c 1000 /dev/urandom",
            str(one),
            BackupSettings(devices=1, backup_id="b", mirror=mirror, **SMALL),
        )
    assert str(caught.value) == (
        f"the mirror {shown} is the destination itself: give another destination"
    )
    assert files_under(one) == []


class StuckMirror(ManifestRefusingStorage):
    """A real directory that refuses the manifest and then every delete (a store that
    turned read-only after the streams were committed)."""

    async def delete(self, key: str) -> None:
        await anyio.lowlevel.checkpoint()
        raise StorageError("injected delete failure", url=f"{self.url}/{key}")


async def test_what_is_left_behind_names_the_side_that_kept_it(tmp_path: Path) -> None:
    """The mirror's manifest is refused, then the mirror refuses every delete: the
    error line names the mirror's streams as left behind (the destination's were
    removed; naming them sent the user to clean the wrong place)."""
    one, two = tmp_path / "one", tmp_path / "two"
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(200_000))
    outcome = await run_backup(
        f"cmd:cat {source}",
        str(one),
        BackupSettings(devices=2, backup_id="b", mirror=StuckMirror(two), **SMALL),
    )
    assert not outcome.ok
    assert files_under(one) == []
    left = [f"{two.as_uri()}/b/stream-0{i}-of-02.vdi" for i in range(2)]
    assert files_under(two) == [f"b/stream-0{i}-of-02.vdi" for i in range(2)]
    assert str(outcome.result.error) == (
        f"injected manifest write failure ({two.as_uri()}); left behind: {', '.join(left)}"
    )


async def test_an_overwrite_where_one_side_has_the_key_keeps_the_old_object(
    tmp_path: Path,
) -> None:
    """``write_bytes(overwrite=True)`` through a mirror whose secondary alone has the
    key: refused in one line, the old object kept (the one-sided refusal used to be the
    retryable ``StorageExistsError`` from a failed sink: the old object was deleted and
    the retry then failed with 'the sink is failed')."""
    one, two = tmp_path / "one", tmp_path / "two"
    storage = MirrorStorage(FileStorage(one), FileStorage(two))
    await storage.secondary.write_bytes("b/s", b"old")
    with pytest.raises(StorageError) as caught:
        await storage.write_bytes("b/s", b"new", overwrite=True)
    assert not isinstance(caught.value, StorageExistsError)
    assert "exists in only one destination" in str(caught.value)
    assert (two / "b" / "s").read_bytes() == b"old"
    assert files_under(one) == []


@pytest.mark.parametrize("inner", ["mirror", "destination"])
async def test_a_mirror_nested_in_the_destination_is_refused(tmp_path: Path, inner: str) -> None:
    """One directory inside the other: refused before anything is written (it used to
    run, and `storage audit` of the outer one then listed the inner one's backups as
    unreadable foreign objects)."""
    outer, nested = tmp_path / "outer", tmp_path / "outer" / "copy"
    dest, mirror = (outer, nested) if inner == "mirror" else (nested, outer)
    with pytest.raises(ConfigError) as caught:
        await run_backup(
            "cmd:head -c 1000 /dev/urandom",
            str(dest),
            BackupSettings(devices=1, backup_id="b", mirror=str(mirror), **SMALL),
        )
    assert str(caught.value) == (
        f"the mirror {mirror.as_uri()} and the destination {dest.as_uri()} are one inside "
        "the other: give two separate destinations"
    )
    assert not outer.exists()


async def test_an_s3_mirror_under_the_destinations_prefix_is_refused(
    moto_server: MotoServer, bucket: str
) -> None:
    """The same for object storage: ``s3://b/db1/copy`` inside ``s3://b/db1``."""
    endpoint = f"endpoint_url={moto_server.endpoint}"
    dest, mirror = f"s3://{bucket}/db1?{endpoint}", f"s3://{bucket}/db1/copy?{endpoint}"
    with pytest.raises(ConfigError) as caught:
        await run_backup(
            "cmd:head -c 1000 /dev/urandom",
            dest,
            BackupSettings(devices=1, backup_id="b", mirror=mirror, **SMALL),
        )
    assert str(caught.value) == (
        f"the mirror s3://{bucket}/db1/copy and the destination s3://{bucket}/db1 are one "
        "inside the other: give two separate destinations"
    )


class PublishRefusingStorage(FileStorage):
    """A real directory whose sinks fail at the very end (the store refuses the
    publish: a rename on a volume gone read-only, a lost connection)."""

    async def open_sink(self, key: str, *, device: str | None = None) -> FileSink:
        sink = await super().open_sink(key, device=device)

        async def refuse() -> None:
            await anyio.lowlevel.checkpoint()
            raise StorageError("injected publish failure", url=sink.url)

        sink._publish = refuse  # type: ignore[method-assign]
        return sink


async def test_one_side_taken_and_the_other_failing_is_not_the_retryable_refusal(
    tmp_path: Path,
) -> None:
    """The primary already has the key, the secondary fails its publish: the failed
    sink raises the secondary's own error, not ``StorageExistsError`` (which tells a
    caller to delete the old object and commit again); the old object is kept."""
    one, two = tmp_path / "one", tmp_path / "two"
    storage = MirrorStorage(FileStorage(one), PublishRefusingStorage(two))
    await storage.primary.write_bytes("b/s", b"old")
    sink = await storage.open_sink("b/s")
    await sink.write(memoryview(b"new stream"))
    with pytest.raises(StorageError) as caught:
        await sink.commit()
    assert not isinstance(caught.value, StorageExistsError)
    assert str(caught.value).startswith(
        f"injected publish failure ({(two / 'b' / 's').as_uri()}); and "
    )
    await sink.abort()
    assert (one / "b" / "s").read_bytes() == b"old"
    assert files_under(two) == []
