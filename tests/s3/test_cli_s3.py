"""The command line against the local S3 server: backup, list, verify, restore, audit."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cli.test_cli import files, make_tree, vdistream
from tests.s3.conftest import MotoServer


def test_striped_encrypted_backup_to_s3(
    moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    key = tmp_path / "key"
    vdistream("keygen", str(key))
    dest = f"s3://{bucket}/db1?endpoint_url={moto_server.endpoint}"
    summary = json.loads(
        vdistream(
            "backup",
            f"cmd:tar -C {src} -cf - .",
            dest,
            "--compress",
            "zstd:3",
            "--encrypt-key-file",
            str(key),
            "--json",
        ).stdout
    )
    assert summary["status"] == "succeeded"
    backup_id = summary["id"]
    stored = moto_server.keys(bucket, "db1/")
    assert f"db1/{backup_id}/manifest.json" in stored
    assert len([k for k in stored if k.endswith(".vdi")]) == 4
    assert moto_server.uploads(bucket) == []  # every multipart upload completed

    listed = json.loads(vdistream("list", dest, "--json").stdout)
    assert [row["id"] for row in listed] == [backup_id]
    ref = f"s3://{bucket}/db1/{backup_id}?endpoint_url={moto_server.endpoint}"
    report = json.loads(vdistream("verify", ref, "--encrypt-key-file", str(key), "--json").stdout)
    assert report["status"] == "verified"
    out = tmp_path / "out"
    out.mkdir()
    vdistream("restore", ref, f"cmd:tar -x -C {out}", "--encrypt-key-file", str(key))
    assert files(out) == files(src)

    # a failed job's debris is found and cleaned by the audit; the backup stays
    moto_server.client.put_object(Bucket=bucket, Key="db1/orphan/stream-00-of-01.vdi", Body=b"x")
    upload = moto_server.client.create_multipart_upload(Bucket=bucket, Key="db1/orphan/up.vdi")
    audit = json.loads(
        vdistream("storage", "audit", dest, "--min-age", "0", "--clean", "--json").stdout
    )
    assert "orphan/stream-00-of-01.vdi" in " ".join(audit["orphan_objects"])
    assert upload["UploadId"] in json.dumps(audit["orphan_uploads"])
    assert moto_server.uploads(bucket) == []
    assert f"db1/{backup_id}/manifest.json" in moto_server.keys(bucket, "db1/")
    assert "db1/orphan/stream-00-of-01.vdi" not in moto_server.keys(bucket, "db1/")
    assert os.environ.get("AWS_ACCESS_KEY_ID")  # the credential chain, from the environment


def test_unreachable_s3_is_a_clear_error(tmp_path: Path) -> None:
    done = vdistream(
        "backup",
        "cmd:head -c 1000 /dev/zero",
        "s3://nobucket/x?endpoint_url=http://127.0.0.1:9",
        check=1,
    )
    assert "nobucket" in done.stderr


def test_a_missing_bucket_and_a_taken_id_are_refused_before_the_engine_starts(
    moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """The producer never runs: it would create ``started`` at once."""
    started = tmp_path / "started"
    producer = f"cmd:sh -c 'touch {started}; head -c 100000 /dev/urandom'"
    missing = f"s3://no-such-bucket/x?endpoint_url={moto_server.endpoint}"
    done = vdistream("backup", producer, missing, check=1)
    assert done.stderr.count("\n") == 1, done.stderr
    assert "no such bucket" in done.stderr
    assert not started.exists()

    dest = f"s3://{bucket}/db?endpoint_url={moto_server.endpoint}"
    first = vdistream("backup", "cmd:head -c 1000 /dev/urandom", dest, "--id", "nightly")
    assert first.stdout == "nightly\n"
    again = vdistream("backup", producer, dest, "--id", "nightly", check=1)
    assert again.stderr.count("\n") == 1, again.stderr
    assert "backup nightly already exists in s3://" in again.stderr
    assert not started.exists()
