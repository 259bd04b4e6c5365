"""``vdistream key``: key pairs for recipients, and rewrapping the data keys of backups.

``key generate`` writes an X25519 key pair. ``key rotate``, ``key add`` and ``key
remove`` rewrap the data key in every backup's manifest of a destination
(:mod:`vdistream.operations.keys`): no stream is read or written, each manifest is
replaced atomically, and a rerun after an interruption finishes the job. ``key list``
shows what opens each backup. A key is named by a file (a key file, an X25519 public
key or an X25519 private key: told apart by content), a variable holding a key, a
variable holding a passphrase, or (``remove``) a fingerprint as ``key list`` shows it.

stdout: the result (``--json``: one JSON document); stderr: one line per backup that
failed, then the final line. Exit 0 when every backup was done (or had nothing to do),
1 when one failed or a manifest could not be read, 2 for bad usage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import click

from vdistream.cli.framework import CommandError, Params, logging_options, options, runs, say
from vdistream.cli.output import emit

if TYPE_CHECKING:
    from vdistream.operations.keys import KeyRef, RewrapReport

__all__ = ("key",)

_JSON = click.option(
    "--json", "json_output", is_flag=True, help="Print one JSON object on stdout at the end."
)
_BACKUPS = click.option(
    "--backup",
    "backups",
    metavar="ID",
    multiple=True,
    help="Only this backup (repeatable); default: every backup in DEST.",
)
_DEST = click.argument(
    "dest",
    metavar="DEST",
    help="The destination holding the backups (a directory, file://, s3://, ...).",
)


def _refs(prefix: str, what: str, *, fingerprint: bool = False) -> Callable[[Any], Any]:
    """``--PREFIX FILE`` (repeatable), ``--PREFIX-key-env VAR``, ``--PREFIX-passphrase-env
    VAR`` (``--key-env`` and ``--passphrase-env`` for ``key``; and ``--fingerprint FP``):
    the ways to name keys for one role."""
    stem = "" if prefix == "key" else f"{prefix}-"
    decorators = [
        click.option(
            f"--{prefix}",
            f"{prefix}_files",
            metavar="FILE",
            multiple=True,
            help=f"{what}: a key file, an X25519 public or private key file (repeatable).",
        ),
        click.option(
            f"--{stem}key-env",
            f"{prefix}_key_env",
            metavar="VAR",
            help=f"{what}: the key in this environment variable (hex or base64).",
        ),
        click.option(
            f"--{stem}passphrase-env",
            f"{prefix}_passphrase_env",
            metavar="VAR",
            help=f"{what}: the passphrase in this environment variable.",
        ),
    ]
    if fingerprint:
        decorators.append(
            click.option(
                "--fingerprint",
                "fingerprints",
                metavar="FP",
                multiple=True,
                help=f"{what}: the wrap with this fingerprint, as `key list` shows it "
                "(repeatable).",
            )
        )
    return options(*decorators)


def _collect(params: Params, prefix: str, option: str) -> list[KeyRef]:
    from vdistream.operations.keys import KeyRef

    refs = [KeyRef(file=path) for path in params.get(f"{prefix}_files") or ()]
    if params.get(f"{prefix}_key_env"):
        refs.append(KeyRef(env=params[f"{prefix}_key_env"]))
    if params.get(f"{prefix}_passphrase_env"):
        refs.append(KeyRef(passphrase_env=params[f"{prefix}_passphrase_env"]))
    refs.extend(
        KeyRef(fingerprint=fp) for fp in params.get("fingerprints") or () if prefix == "old"
    )
    if not refs:
        raise click.UsageError(f"give {option}")
    return refs


def _report(params: Params, report: RewrapReport, verb: str, command: str) -> int:
    """The result on stdout, failures on stderr; the exit code."""
    dest = params["dest"]
    for backup_id, error in report.failed:
        say(f"vdistream: backup {backup_id}: {error}", err=True)
    for backup_id, owner in report.running:
        say(
            f"vdistream: backup {backup_id} is being written ({owner}): it keeps the keys "
            f"its job was given; run `vdistream key {command}` again once it has finished",
            err=True,
        )
    for problem in report.unreadable:
        say(f"vdistream: warning: {problem}", err=True)
    parts = [f"{verb} {len(report.changed)} backup{'s' if len(report.changed) != 1 else ''}"]
    if report.unchanged:
        reasons: dict[str, int] = {}
        for _, reason in report.unchanged:
            reasons[reason] = reasons.get(reason, 0) + 1
        parts.append(", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())))
    if report.failed:
        parts.append(f"{len(report.failed)} failed")
    if report.running:
        parts.append(f"{len(report.running)} being written")
    text = f"{'; '.join(parts)} in {dest}"
    if report.legacy:
        text += (
            f"; {len(report.legacy)} made before envelope encryption: their streams stay "
            "encrypted with the old key, which still decrypts them and which whoever holds "
            "a new key can now recover"
        )
    emit(params["json_output"], report.to_dict(), text)
    return 0 if report.ok else 1


async def _check_dest(dest: str) -> None:
    """A directory destination that is missing is an error, not "no backups" (as the
    local commands say it; object stores answer for themselves)."""
    from vdistream.operations import opened_storage
    from vdistream.storage.file import FileStorage

    async with opened_storage(dest) as storage:
        if isinstance(storage, FileStorage):
            path = anyio.Path(storage.path)
            if not await path.is_dir():
                reason = "is not a directory" if await path.exists() else "no such directory"
                raise CommandError(f"{dest}: {reason}")


@click.group("key", short_help="Key pairs, and rewrapping backups' keys (rotate, add, remove).")
@logging_options
def key() -> None:
    """Envelope encryption: every encrypted backup has its own random data key, kept in
    its manifest wrapped for one or more keys (a key file, a passphrase, an X25519 public
    key). These commands change those wraps; no stream is read or rewritten."""


@key.command("generate", short_help="Write a new X25519 key pair (private key mode 0600).")
@click.argument(
    "private",
    metavar="PRIVATE",
    help="The new private key file (mode 0600); an existing file is never overwritten.",
)
@click.option(
    "--public",
    "public",
    metavar="FILE",
    help="Where the public key goes (default: PRIVATE.pub).",
)
@_JSON
@logging_options
@runs("no key was written")
async def generate(params: Params) -> int:
    """Write a new X25519 private key to PRIVATE (PEM, mode 0600) and its public key to
    PRIVATE.pub; neither file may exist. Back up to the public key (--encrypt-recipient
    on the database host); keep the private key elsewhere, for restores."""
    from vdistream.pipeline.envelope import generate_identity

    private = params["private"]
    public = params["public"] or f"{private}.pub"
    identity = await anyio.to_thread.run_sync(generate_identity, private, public)
    emit(
        params["json_output"],
        {"private_key": private, "public_key": public, "fingerprint": identity.fingerprint},
        f"wrote a new X25519 private key to {private} (mode 0600) and its public key to "
        f"{public}, fingerprint {identity.fingerprint}",
    )
    return 0


@key.command("rotate", short_help="Rewrap every backup's data key from old keys to new ones.")
@_DEST
@_refs("old", "A key the backups open with now, to be replaced")
@_refs("new", "The new key")
@_BACKUPS
@_JSON
@logging_options
@runs("each manifest is either rewrapped or untouched; run the command again to finish")
async def rotate(params: Params) -> int:
    """Open each backup's data key in DEST with the old key, wrap it for the new keys and
    drop the old key's wrap: afterwards the old key opens none of them. Backups already
    rotated (a rerun) are left as they are. No stream is touched, so a copy of an old
    manifest still opens with the old key: after a compromise, make new backups too."""
    from vdistream.operations.keys import rotate_keys

    old = _collect(params, "old", "the old key (--old, --old-key-env or --old-passphrase-env)")
    new = _collect(params, "new", "the new key (--new, --new-key-env or --new-passphrase-env)")
    await _check_dest(params["dest"])
    report = await rotate_keys(params["dest"], old, new, backups=params["backups"])
    return _report(params, report, "rotated", "rotate")


@key.command("add", short_help="Wrap every backup's data key for one more key or recipient.")
@_DEST
@_refs("key", "A key the backups open with")
@_refs("new", "The key to add")
@click.option(
    "--recipient",
    "recipients",
    metavar="FILE",
    multiple=True,
    help="An X25519 public key to add (repeatable; the same as --new FILE).",
)
@_BACKUPS
@_JSON
@logging_options
@runs("each manifest is either rewrapped or untouched; run the command again to finish")
async def add(params: Params) -> int:
    """Open each backup's data key in DEST with --key and wrap it for the new keys too;
    the keys it had still open it."""
    from vdistream.operations.keys import KeyRef, add_keys

    opener = _collect(
        params, "key", "a key the backups open with (--key, --key-env or --passphrase-env)"
    )
    new = [KeyRef(file=path) for path in params["recipients"]]
    if params["new_files"] or params["new_key_env"] or params["new_passphrase_env"] or not new:
        new += _collect(
            params, "new", "the key to add (--new, --recipient or --new-passphrase-env)"
        )
    await _check_dest(params["dest"])
    report = await add_keys(params["dest"], opener, new, backups=params["backups"])
    return _report(params, report, "added the key to", "add")


@key.command("remove", short_help="Remove a key or recipient from every backup's wraps.")
@_DEST
@_refs("old", "The key to remove", fingerprint=True)
@_BACKUPS
@_JSON
@logging_options
@runs("each manifest is either rewrapped or untouched; run the command again to finish")
async def remove(params: Params) -> int:
    """Drop the wraps of the given keys from each backup in DEST; needs no key to open
    them. A backup's last wrap is never removed (that backup fails, the others go on)."""
    from vdistream.operations.keys import remove_keys

    old = _collect(
        params, "old", "the key to remove (--old, --fingerprint or --old-passphrase-env)"
    )
    await _check_dest(params["dest"])
    report = await remove_keys(params["dest"], old, backups=params["backups"])
    return _report(params, report, "removed the key from", "remove")


@key.command("list", short_help="Show what opens each backup in a destination.")
@_DEST
@_JSON
@logging_options
@runs("nothing was changed")
async def list_(params: Params) -> int:
    """One line per backup in DEST: encrypted or not, and the fingerprints of the keys,
    passphrases and recipients its data key is wrapped for."""
    from vdistream.operations.keys import list_keys

    await _check_dest(params["dest"])
    rows, problems = await list_keys(params["dest"])
    for problem in problems:
        say(f"vdistream: warning: {problem}", err=True)
    lines = []
    for row in rows:
        if not row["encrypted"]:
            lines.append(f"{row['id']}  not encrypted")
            continue
        keys = ", ".join(f"{k['type']} {k['fingerprint']}" for k in row["keys"])
        lines.append(f"{row['id']}  {row['format']}: {keys}")
    emit(params["json_output"], {"backups": rows, "problems": problems}, "\n".join(lines))
    if not rows and not params["json_output"]:
        say(f"no backups in {params['dest']}", err=True)
    return 1 if problems else 0
