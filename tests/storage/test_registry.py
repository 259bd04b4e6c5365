"""Storage URLs resolved through the scheme registry."""

from __future__ import annotations

from pathlib import Path

import pytest

import vdistream.storage
import vdistream.testing
from vdistream.errors import StorageURLError
from vdistream.storage import (
    FileStorage,
    MemoryStorage,
    NullStorage,
    Storage,
    StorageRegistry,
    default_registry,
    open_storage,
)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://x", "unknown storage scheme 'ftp'"),
        ("bogus:", "unknown storage scheme 'bogus'"),
        ("S3X://bucket/prefix", "unknown storage scheme 's3x'"),
        ("", "malformed storage URL"),
        ("://nothing", "malformed storage URL"),
        ("1x://y", "malformed storage URL"),
        ("/a\0b", "malformed storage URL"),
        ("file://host/x", "must not name another host"),
    ],
)
def test_bad_urls_name_the_url_and_the_known_schemes(url: str, reason: str) -> None:
    with pytest.raises(StorageURLError) as caught:
        open_storage(url)
    message = str(caught.value)
    assert reason in message
    assert "known schemes: azure, file, memory, null" in message
    assert caught.value.url == url
    assert message.endswith(f"({url})")


def test_builtin_schemes_case_insensitive(tmp_path: Path) -> None:
    assert default_registry.schemes == ("azure", "file", "memory", "null", "s3")
    assert isinstance(open_storage(tmp_path.as_uri().replace("file:", "FILE:")), FileStorage)
    assert isinstance(open_storage("Memory://m"), MemoryStorage)
    assert isinstance(open_storage("null://"), NullStorage)
    assert isinstance(open_storage(tmp_path), FileStorage)  # os.PathLike


def test_register_a_scheme() -> None:
    registry = StorageRegistry()
    with pytest.raises(StorageURLError, match="known schemes: none"):
        registry.open_storage("/plain/path")  # no file scheme in an empty registry
    seen: list[str] = []

    def factory(url: str) -> Storage:
        seen.append(url)
        return NullStorage(url)

    registry.register("Demo", factory)
    storage = registry.open_storage("demo://bucket/prefix")
    assert seen == ["demo://bucket/prefix"]
    assert storage.url == "demo://bucket/prefix"
    assert registry.schemes == ("demo",)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("DEMO", factory)
    with pytest.raises(ValueError, match="invalid URL scheme"):
        registry.register("no good", factory)


def test_factory_errors_gain_the_schemes_and_keep_the_cause() -> None:
    with pytest.raises(StorageURLError) as caught:
        open_storage("memory://")
    assert str(caught.value) == (
        "expected memory://store-name[/prefix]; known schemes: azure, file, memory, null, s3 (memory://)"
    )
    assert isinstance(caught.value.__cause__, StorageURLError)


def test_public_names_are_a_tuple_of_every_submodule_export() -> None:
    from vdistream.storage import base, file, memory, null, registry
    from vdistream.testing import storage_suite

    for package, modules in [
        (vdistream.storage, [base, file, memory, null, registry]),
        (vdistream.testing, [storage_suite]),
    ]:
        assert isinstance(package.__all__, tuple)
        assert sorted(package.__all__) == sorted({n for m in modules for n in m.__all__})
        for name in package.__all__:
            assert hasattr(package, name), name
