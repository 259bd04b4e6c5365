"""The settings of issue 16: webhooks, max_rate, mirror, encrypt_recipients and
decrypt_identity_file, azure:// destinations; good values, and bad ones with the
exact one-line error (file, line, key)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vdistream.service import SettingsError, load_settings, settings_summary
from vdistream.service.settings import WEBHOOK_EVENTS, Secret

SECRET = "webhook-secret-0123456789"

BASE = """\
[destinations.local]
url = "/var/backups/x"

[destinations.offsite]
url = "azure://acct/container/prefix"

[databases.app]
url = "sqlite:///srv/app.db"
destination = "local"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vdistream.toml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, text), env=env or {})
    return str(caught.value)


def line_of(text: str, needle: str, nth: int = 1) -> int:
    found = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    return found[nth - 1]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "hook.secret"
    path.write_text(SECRET + "\nsecond line ignored\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def x25519(tmp_path: Path) -> tuple[Path, Path]:
    """An X25519 key pair as PEM files: (public, private)."""
    key = X25519PrivateKey.generate()
    public, private = tmp_path / "backup.pub", tmp_path / "backup.key"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    return public, private


# --- good values ------------------------------------------------------------------------


def test_webhooks_of_the_service_and_of_a_database(tmp_path: Path, secret_file: Path) -> None:
    text = f"""\
[service]
max_jobs = 2

[[service.webhooks]]
url = "https://user:pw@hooks.example.com/v?token=abc"
secret_file = "hook.secret"

[[service.webhooks]]
url = "http://127.0.0.1:9000/second"
events = ["failed", "verify_failed"]
secret_env = "HOOK_SECRET"
timeout = "30s"
attempts = 3
deadline = "2m"

{BASE}
[[databases.app.webhooks]]
url = "http://127.0.0.1:9001/app"
events = ["retention_pruned"]
secret_file = "{secret_file}"
"""
    settings = load_settings(write(tmp_path, text), env={"HOOK_SECRET": "env-secret-0123456789"})
    first, second = settings.service.webhooks
    assert first.url == "https://user:pw@hooks.example.com/v?token=abc"
    assert first.display_url == "https://user:***@hooks.example.com/v?***"
    assert first.secret == Secret(SECRET)  # the file's first line
    assert first.events == frozenset(WEBHOOK_EVENTS)
    assert (first.timeout, first.attempts, first.deadline) == (10.0, 5, 300.0)
    assert first.secret_source == str(secret_file)  # relative to the file
    assert second.secret.reveal() == "env-secret-0123456789"
    assert second.secret_source == "$HOOK_SECRET"
    assert second.events == {"failed", "verify_failed"}
    assert (second.timeout, second.attempts, second.deadline) == (30.0, 3, 120.0)
    (app,) = settings.databases["app"].webhooks
    assert (app.url, app.events) == ("http://127.0.0.1:9001/app", {"retention_pruned"})
    shown = repr(settings) + str(settings_summary(settings))
    for secret in (SECRET, "env-secret", "token=abc"):
        assert secret not in shown
    assert settings_summary(settings)["service"]["webhooks"][1] == {
        "url": "http://127.0.0.1:9000/second",
        "events": ["failed", "verify_failed"],
        "secret": "$HOOK_SECRET",
        "timeout": 30.0,
        "attempts": 3,
        "deadline": 120.0,
    }


def test_a_reader_that_checks_no_passwords_reads_no_webhook_secret(tmp_path: Path) -> None:
    """``check_passwords=False`` (the client, prune): a secret it could not read is
    not looked for."""
    text = BASE + '[[databases.app.webhooks]]\nurl = "http://x.example"\nsecret_env = "NOPE"\n'
    settings = load_settings(write(tmp_path, text), env={}, check_passwords=False)
    assert settings.databases["app"].webhooks[0].secret_source == "$NOPE"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"200M"', 200 * 1024**2),
        ('"1.5G"', int(1.5 * 1024**3)),
        ('"10MB"', 10_000_000),
        ("50000000", 50_000_000),
        ('"off"', None),
        ("0", None),
        ('""', None),
    ],
)
def test_max_rate(tmp_path: Path, value: str, expected: int | None) -> None:
    text = f"[service]\nmax_rate = {value}\n{BASE}max_rate = {value}\n"
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.service.max_rate == expected
    assert settings.databases["app"].max_rate == expected


def test_max_rate_from_the_environment(tmp_path: Path) -> None:
    env = {"VDISTREAM_SERVICE__MAX_RATE": "1G", "VDISTREAM_DATABASES__APP__MAX_RATE": "300K"}
    settings = load_settings(write(tmp_path, BASE), env=env)
    assert settings.service.max_rate == 1024**3
    assert settings.databases["app"].max_rate == 300 * 1024
    assert settings_summary(settings)["databases"]["app"]["max_rate"] == 300 * 1024


def test_mirror_and_an_azure_destination(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE + 'mirror = "offsite"\n'), env={})
    assert settings.databases["app"].mirror == "offsite"
    assert settings.destinations["offsite"].url == "azure://acct/container/prefix"
    assert settings_summary(settings)["databases"]["app"]["mirror"] == "offsite"
    assert (
        load_settings(write(tmp_path, BASE + 'mirror = ""\n'), env={}).databases["app"].mirror
        is None
    )


def test_recipients_and_identity(tmp_path: Path, x25519: tuple[Path, Path]) -> None:
    public, private = x25519
    text = (
        BASE + f'encrypt_recipients = ["backup.pub", "{public}"]\n'
        'decrypt_identity_file = "backup.key"\n'
    )
    app = load_settings(write(tmp_path, text), env={}).databases["app"]
    assert app.encrypt_recipients == (public,)  # relative to the file; twice is once
    assert app.decrypt_identity_file == private
    assert app.encrypted
    assert app.encrypt_key_file is None


# --- bad values -------------------------------------------------------------------------


def test_a_webhook_without_a_secret(tmp_path: Path) -> None:
    text = BASE + '\n[[service.webhooks]]\nurl = "https://hooks.example.com"\n'
    path = write(tmp_path, text)
    assert error(tmp_path, text) == (
        f"{path}, line {line_of(text, '[[service.webhooks]]')}: service.webhooks[0]: missing: "
        "secret_file or secret_env, the key every request is signed with (HMAC-SHA256), "
        'e.g. secret_file = "/etc/vdistream/webhook.secret"'
    )


def test_bad_webhook_values_each_name_their_key_and_line(tmp_path: Path, secret_file: Path) -> None:
    """The second [[databases.app.webhooks]] is element [1]; every problem is a line."""
    hook = f'secret_file = "{secret_file}"\n'
    text = (
        BASE
        + f'\n[[databases.app.webhooks]]\nurl = "http://a.example"\n{hook}'
        + "\n[[databases.app.webhooks]]\n"
        + 'url = "ftp://b.example"\n'
        + 'events = ["failed", "done"]\n'
        + "attempts = 0\n"
        + "timeout = 0\n"
        + "secret = 1\n"
        + hook
    )
    path = write(tmp_path, text)
    key = "databases.app.webhooks[1]"
    assert error(tmp_path, text).splitlines() == [
        f"{path}, line {line_of(text, 'secret = 1')}: {key}.secret: unknown key in [{key}]; "
        "did you mean 'secret_env'? (known: url, events, secret_file, secret_env, timeout, "
        "attempts, deadline)",
        f"{path}, line {line_of(text, 'ftp://')}: {key}.url: 'ftp://b.example' is not an "
        "http:// or https:// URL with a host",
        f"{path}, line {line_of(text, 'events')}: {key}.events: unknown event 'done' (known: "
        "finished, failed, verify_failed, retention_pruned)",
        f"{path}, line {line_of(text, 'timeout')}: {key}.timeout: expected more than 0 "
        "and at most 86400 seconds, got 0",
        f"{path}, line {line_of(text, 'attempts')}: {key}.attempts: expected an integer from 1 "
        "to 20, got 0",
    ]


@pytest.mark.parametrize(
    ("lines", "key", "problem"),
    [
        (
            'secret_file = "hook.secret"\nsecret_env = "HOOK"',
            "secret_env",
            "give secret_file or secret_env, not both (the HMAC key)",
        ),
        (
            'secret_env = "UNSET_HOOK"',
            "secret_env",
            "the environment variable UNSET_HOOK is not set: it holds the webhook's HMAC key "
            "(at least 16 characters)",
        ),
        (
            'secret_env = "SHORT_HOOK"',
            "secret_env",
            "the environment variable SHORT_HOOK is shorter than 16 characters: it holds the "
            "webhook's HMAC key (at least 16 characters)",
        ),
        ('secret_env = "1-bad"', "secret_env", "'1-bad' is not an environment variable name"),
        (
            'secret_file = "open.secret"',
            "secret_file",
            "{tmp}/open.secret is accessible to others (mode 0o644); chmod o-rwx it",
        ),
        (
            'secret_file = "short.secret"',
            "secret_file",
            "the webhook secret in {tmp}/short.secret must have at least 16 characters",
        ),
        (
            'secret_env = "HOOK"\nevents = []',
            "events",
            "name at least one event (finished, failed, verify_failed, retention_pruned), or "
            "leave events out for all",
        ),
        (
            'secret_env = "HOOK"\nevents = "failed"',
            "events",
            "expected an array of event names (finished, failed, verify_failed, "
            "retention_pruned), got 'failed'",
        ),
        ('secret_env = "HOOK"\ndeadline = "soon"', "deadline", None),
    ],
)
def test_bad_webhook_secrets_and_events(
    tmp_path: Path, secret_file: Path, lines: str, key: str, problem: str | None
) -> None:
    (tmp_path / "open.secret").write_text(SECRET)
    (tmp_path / "open.secret").chmod(0o644)
    (tmp_path / "short.secret").write_text("short\n")
    (tmp_path / "short.secret").chmod(0o600)
    env = {"HOOK": SECRET, "SHORT_HOOK": "short"}
    text = f'[[service.webhooks]]\nurl = "https://h.example"\n{lines}\n' + BASE
    path = write(tmp_path, text)
    found = error(tmp_path, text, env)
    where = f"{path}, line {line_of(text, key + ' =')}: service.webhooks[0].{key}: "
    if problem is None:
        assert found.startswith(where + "'soon' is not a duration"), found
    else:
        assert found == where + problem.format(tmp=tmp_path)


def test_webhooks_that_are_no_array(tmp_path: Path) -> None:
    text = "[service]\nwebhooks = 3\n" + BASE
    assert error(tmp_path, text) == (
        f"{write(tmp_path, text)}, line 2: service.webhooks: expected an array, got an integer 3"
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (
            '"fast"',
            "'fast' is not a rate; give bytes per second like 500K, 200M or 1.5G (powers of "
            'of 1024; KB, MB, GB are powers of 1000), or "off"',
        ),
        ("-5", "-5 is negative; give bytes per second like 500K"),
        ("true", "expected a rate like 200M, got bool"),
    ],
)
def test_bad_max_rate(tmp_path: Path, value: str, problem: str) -> None:
    text = BASE + f"max_rate = {value}\n"
    found = error(tmp_path, text)
    where = f"{write(tmp_path, text)}, line {line_of(text, 'max_rate')}: databases.app.max_rate: "
    assert found.startswith(where + problem.replace("of of", "of")), found
    assert "\n" not in found


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"elsewhere"', "no [destinations.elsewhere] table (defined: local, offsite)"),
        (
            '"local"',
            "the mirror is the database's destination itself (local): name another "
            "[destinations.NAME]",
        ),
        ("3", "expected a string, got an integer 3"),
    ],
)
def test_bad_mirror(tmp_path: Path, value: str, problem: str) -> None:
    text = BASE + f"mirror = {value}\n"
    path = write(tmp_path, text)
    assert error(tmp_path, text) == (
        f"{path}, line {line_of(text, 'mirror')}: databases.app.mirror: {problem}"
    )


@pytest.mark.parametrize("url", ["azure://acct", "azure://acct/", "azure:///container/prefix"])
def test_an_azure_url_needs_an_account_and_a_container(tmp_path: Path, url: str) -> None:
    text = BASE.replace("azure://acct/container/prefix", url)
    path = write(tmp_path, text)
    assert error(tmp_path, text) == (
        f"{path}, line {line_of(text, 'azure:')}: destinations.offsite.url: {url} names no "
        "storage account and container: azure://ACCOUNT/CONTAINER/PREFIX"
    )


def test_bad_recipients_and_identity(tmp_path: Path, x25519: tuple[Path, Path]) -> None:
    public, private = x25519
    missing = tmp_path / "missing.pub"
    text = BASE + f'encrypt_recipients = ["{public}", "{missing}"]\n'
    found = error(tmp_path, text)
    where = f"{write(tmp_path, text)}, line {line_of(text, 'encrypt_recipients')}: "
    assert found.startswith(where + "databases.app.encrypt_recipients[1]: "), found
    assert str(missing) in found
    assert "\n" not in found
    # a private key is no recipient
    text = BASE + f'encrypt_recipients = ["{private}"]\n'
    found = error(tmp_path, text)
    assert found.startswith(where + "databases.app.encrypt_recipients[0]: "), found
    text = BASE + 'encrypt_recipients = "one.pub"\n'
    assert error(tmp_path, text) == where + (
        "databases.app.encrypt_recipients: expected an array, got a string 'one.pub'"
    )
    text = BASE + 'decrypt_identity_file = "nowhere.key"\n'
    assert error(tmp_path, text) == (
        f"{write(tmp_path, text)}, line {line_of(text, 'decrypt_identity_file')}: "
        f"databases.app.decrypt_identity_file: {tmp_path}/nowhere.key does not exist"
    )
    assert os.path.exists(public)


def test_recipients_alone_need_verify_after_backup_off(
    tmp_path: Path, x25519: tuple[Path, Path]
) -> None:
    """A host that holds no key of its backups cannot verify them after each backup:
    refused at load, not by a failed verification after every backup."""
    public, _ = x25519
    text = BASE + f'encrypt_recipients = ["{public}"]\n'
    assert error(tmp_path, text) == (
        f"{write(tmp_path, text)}, line {line_of(text, 'encrypt_recipients')}: "
        "databases.app.encrypt_recipients: backups encrypted only for recipients cannot be "
        "verified after each backup without a private key: give decrypt_identity_file (or "
        "encrypt_key_file), or set verify_after_backup = false and verify where the private "
        "key is"
    )
    app = load_settings(write(tmp_path, text + "verify_after_backup = false\n"), env={}).databases[
        "app"
    ]
    assert app.encrypt_recipients == (public,)
    assert app.verify_after_backup is False


def test_the_example_file_documents_every_new_key() -> None:
    from vdistream.service.settings import _schema

    example = Path(__file__).resolve().parents[2] / "config" / "vdistream.toml"
    text = example.read_text()
    assert "# [[service.webhooks]]" in text
    assert "# [[databases.app.webhooks]]" in text
    keys = (*_schema.WebhookIn.model_fields, "max_rate", "mirror", "encrypt_recipients")
    for key in (*keys, "decrypt_identity_file", "webhooks"):
        assert re.search(rf"^#\s*{key} =", text, re.M), key
    assert "azure://ACCOUNT/CONTAINER/PREFIX" in text
    load_settings(example, env={})  # still loads, every new key commented out


@pytest.mark.parametrize(
    ("main", "other"),
    [
        ("/var/backups/x", "file:///var/backups/x/"),
        ("/var/backups/x", "/var/backups/./x"),
        ("s3://bucket/prefix?region=eu-central-1", "s3://bucket/prefix/"),
        ("azure://acct/container/p", "azure://ACCT/container/p/"),
    ],
)
def test_a_mirror_at_the_same_place_under_another_name(
    tmp_path: Path, main: str, other: str
) -> None:
    """Two names, one place: every backup would be refused when it starts (the mirror
    is the destination itself); refused at load, naming both tables."""
    text = BASE.replace("/var/backups/x", main).replace("azure://acct/container/prefix", other)
    text += 'mirror = "offsite"\n'
    found = error(tmp_path, text)
    assert found.startswith(
        f"{write(tmp_path, text)}, line {line_of(text, 'mirror')}: databases.app.mirror: "
        "[destinations.offsite] is the same place as the database's destination "
        "[destinations.local] ("
    ), found
    assert found.endswith("): a mirror needs another place")
    assert "\n" not in found


def test_a_mirror_elsewhere_on_the_same_storage_is_fine(tmp_path: Path) -> None:
    text = BASE.replace("azure://acct/container/prefix", "/var/backups/y") + 'mirror = "offsite"\n'
    assert load_settings(write(tmp_path, text), env={}).databases["app"].mirror == "offsite"


def test_an_identity_that_is_no_private_key_or_not_a_recipients(
    tmp_path: Path, x25519: tuple[Path, Path]
) -> None:
    """decrypt_identity_file must hold an X25519 private key; with recipients alone
    (and the verification after each backup) it must be one of theirs, else every
    verification after a backup fails."""
    public, private = x25519
    where = "databases.app.decrypt_identity_file: "
    text = BASE + f'encrypt_recipients = ["{public}"]\ndecrypt_identity_file = "{public}"\n'
    found = error(tmp_path, text)
    line = f"{write(tmp_path, text)}, line {line_of(text, 'decrypt_identity_file')}: "
    assert found.startswith(line + where + f"{public} holds a public key"), found

    other = tmp_path / "other.key"
    other.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    other.chmod(0o600)
    text = BASE + f'encrypt_recipients = ["{public}"]\ndecrypt_identity_file = "{other}"\n'
    assert error(tmp_path, text) == line + where + (
        f"{other} is the private key of none of encrypt_recipients: the verification after "
        "each backup could not open it (give the private key of one of them, or set "
        "verify_after_backup = false)"
    )
    # not verified here: another host's key is fine; and the right key loads
    load_settings(write(tmp_path, text + "verify_after_backup = false\n"), env={})
    text = BASE + f'encrypt_recipients = ["{public}"]\ndecrypt_identity_file = "{private}"\n'
    assert load_settings(write(tmp_path, text), env={}).databases["app"].decrypt_identity_file


@pytest.mark.parametrize(
    ("value", "shown"),
    [("-1", "-1"), ("86401", "86401"), ('"0s"', "'0s'"), ("1e9", "1000000000.0")],
)
def test_webhook_seconds_out_of_range_say_the_range(
    tmp_path: Path, secret_file: Path, value: str, shown: str
) -> None:
    """Not "0 to 86400" (0 is refused too): one message for both ends."""
    text = (
        BASE + f'\n[[service.webhooks]]\nurl = "http://a.example"\nsecret_file = "{secret_file}"\n'
        f"deadline = {value}\n"
    )
    assert error(tmp_path, text) == (
        f"{write(tmp_path, text)}, line {line_of(text, 'deadline')}: service.webhooks[0]."
        f"deadline: expected more than 0 and at most 86400 seconds, got {shown}"
    )


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ("webhooks = {}", "databases.app.webhooks", "expected an array, got a table"),
        ("retention = []", "databases.app.retention", "expected a table, got an array"),
        ("webhooks = [[]]", "databases.app.webhooks[0]", "expected a table, got an array"),
    ],
)
def test_a_table_or_an_array_of_the_wrong_kind_is_named_once(
    tmp_path: Path, line: str, key: str, problem: str
) -> None:
    text = BASE + line + "\n"
    assert error(tmp_path, text) == (
        f"{write(tmp_path, text)}, line {line_of(text, line)}: {key}: {problem}"
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (
            "azure://acct:c2VjcmV0a2V5@acct/container/p",
            "azure://***@acct/container/p: an azure URL must not carry credentials; set "
            "AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_KEY",
        ),
        (
            "azure://c2VjcmV0a2V5@acct/container/p",
            "azure://***@acct/container/p: an azure URL must not carry credentials; set "
            "AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_KEY",
        ),
        (
            "azure://acct/container/p?sv=2024-01-01&sig=c2VjcmV0c2ln",
            "azure://acct/container/p?***: unknown azure URL option 'sv' (known: endpoint)",
        ),
    ],
)
def test_credentials_or_unknown_options_in_an_azure_url_are_refused_unrepeated(
    tmp_path: Path, url: str, problem: str
) -> None:
    """Every job would fail on them; refused at load, and the error (a terminal, a
    journal) repeats no key, password or SAS signature."""
    text = BASE.replace("azure://acct/container/prefix", url)
    found = error(tmp_path, text)
    assert found == (
        f"{write(tmp_path, text)}, line {line_of(text, url)}: destinations.offsite.url: {problem}"
    )
    assert "c2VjcmV0" not in found


def test_the_azure_url_options_are_the_storages_own() -> None:
    from vdistream.service.settings import _schema
    from vdistream.storage.azure import client as azure

    assert _schema._URL_OPTIONS == {"azure": azure._URL_OPTIONS}
