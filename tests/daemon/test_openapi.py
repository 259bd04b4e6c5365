"""The OpenAPI document: one file in the package (served at /v1/openapi.yaml), the same
in docs/, and every route of the application in it with its methods and codes."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML comes with moto[server]

from tests.daemon.conftest import REPO, embedded_settings
from vdistream.service import Service
from vdistream.service.api import MAX_BODY, MAX_DEPTH, create_app

pytestmark = pytest.mark.timeout(60)

PACKAGED = resources.files("vdistream.service").joinpath("openapi.yaml").read_text("utf-8")


def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(PACKAGED)
    return spec


def test_docs_copy_is_the_packaged_document() -> None:
    assert (REPO / "docs" / "openapi.yaml").read_text("utf-8") == PACKAGED


def test_every_route_is_documented_with_its_error_codes() -> None:
    spec = _spec()
    assert spec["openapi"].startswith("3.1")
    app = create_app(None)  # type: ignore[arg-type]
    routes = {
        (re.sub(r"\{job_id\}", "{id}", r.resource.canonical), r.method.lower())
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    documented -= {(p, "parameters") for p, _ in documented}
    assert routes == documented
    error = spec["components"]["schemas"]["Error"]["properties"]["error"]
    documented_codes = set(error["properties"]["code"]["enum"])
    used: set[str] = set()
    for path in (REPO / "vdistream" / "service").glob("*.py"):
        text = path.read_text()
        used.update(re.findall(r'\bcode ?= ?"([a-z_]+)"', text))  # ServiceError subclasses
        used.update(re.findall(r'_error\(\s*\d+,\s*"([a-z_]+)"', text))  # direct answers
        used.update(re.findall(r'^\s+\d{3}: "([a-z_]+)",$', text, re.MULTILINE))  # HTTP errors
    # aiohttp errors the API never provokes (no such route, header or method exists)
    used -= {"bad_request", "forbidden", "not_acceptable", "length_required"}
    assert {"queue_full", "unauthorized", "body_too_large", "malformed_json"} <= used
    assert used <= documented_codes, used - documented_codes


def test_the_limits_and_the_refusals_are_documented() -> None:
    """The body limits the API enforces are the ones the document states, and every
    operation that reads a body or a query documents how it refuses a bad one."""
    spec = _spec()
    description = " ".join(spec["info"]["description"].split())
    assert f"at most {MAX_BODY} bytes" in description
    assert f"nested at most {MAX_DEPTH} levels" in description
    assert "`limit=²` is a 400" in description
    assert str(MAX_BODY) in spec["components"]["responses"]["TooLarge"]["description"]
    bad_request = " ".join(spec["components"]["responses"]["BadRequest"]["description"].split())
    assert f"nested deeper than {MAX_DEPTH} levels" in bad_request
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method == "post":
                assert {"400", "413", "415"} <= set(operation["responses"]), (path, method)
    for path in ("/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/events"):  # read a query
        assert "400" in spec["paths"][path]["get"]["responses"], path


@pytest.mark.asyncio
async def test_the_document_is_served(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path)
    async with (
        Service(settings) as service,
        aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(settings.service.socket_path))
        ) as http,
        http.get("http://vdistream/v1/openapi.yaml") as response,
    ):
        assert response.status == 200
        assert response.content_type == "application/yaml"
        assert await response.text() == PACKAGED
        assert service.ready
