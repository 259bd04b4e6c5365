"""``vdistream backup ... --mirror DEST2`` end to end in a subprocess: two manifests,
the summary naming both, restore and verify from the mirror alone; an unusable or
self-naming mirror is one line and leaves nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.cli.test_cli import files, make_tree, vdistream
from tests.storage.test_file import files_under


def test_backup_with_mirror_restores_from_the_mirror_alone(tmp_path: Path) -> None:
    src, one, two = tmp_path / "src", tmp_path / "one", tmp_path / "two"
    src.mkdir()
    make_tree(src)
    done = vdistream(
        "backup",
        f"cmd:tar -C {src} -cf - .",
        str(one),
        "--mirror",
        str(two),
        "--devices",
        "3",
        "--compress",
        "zstd:3",
        "--json",
    )
    summary = json.loads(done.stdout)
    backup_id = summary["id"]
    assert summary["status"] == "succeeded"
    assert summary["manifest"] == (one / backup_id / "manifest.json").as_uri()
    assert summary["mirror_manifest"] == (two / backup_id / "manifest.json").as_uri()
    assert files_under(one) == files_under(two)
    assert len(files_under(two)) == 4  # three streams and the manifest
    assert f", mirror {summary['mirror_manifest']}" in done.stderr

    shutil.rmtree(one)  # the mirror alone
    listed = json.loads(vdistream("list", str(two), "--json").stdout)
    assert [row["id"] for row in listed] == [backup_id]
    report = json.loads(vdistream("verify", f"{two}/{backup_id}", "--json").stdout)
    assert report["status"] == "verified"
    out = tmp_path / "out"
    out.mkdir()
    vdistream("restore", f"{two}/{backup_id}", f"cmd:tar -x -C {out}")
    assert files(out) == files(src)


def test_an_unusable_mirror_fails_in_one_line_and_keeps_nothing(tmp_path: Path) -> None:
    one, blocked = tmp_path / "one", tmp_path / "blocked"
    blocked.write_bytes(b"a file where a directory should be")
    done = vdistream(
        "backup", "cmd:head -c 100000 /dev/urandom", str(one), "--mirror", str(blocked), check=1
    )
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"vdistream: error: {blocked}: not a directory (a file is in the way)"
    ]
    assert files_under(one) == []


def test_the_mirror_cannot_be_the_destination(tmp_path: Path) -> None:
    one = tmp_path / "one"
    done = vdistream(
        "backup", "cmd:head -c 1000 /dev/urandom", str(one), "--mirror", str(one), check=2
    )
    assert done.stderr.strip().splitlines() == [
        f"vdistream: error: the mirror {one.as_uri()} is the destination itself: "
        "give another destination"
    ]
    assert not one.exists()
