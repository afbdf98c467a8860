"""/docs and /redoc work in an air-gapped cluster: the pages name no external host, and every
script, stylesheet and icon they load is served by the service itself, with the right type."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest

from tests.service.fakes import FakeEngine
from tests.service.servers import ThreadServer

PAGES = ("/docs", "/redoc")
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


class _Links(HTMLParser):
    """Every src and href in a page, plus URLs the inline scripts name (Swagger UI gets its
    bundle by <script src>, but the OpenAPI URL and the OAuth2 redirect sit in inline JS)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def _parse(html: str) -> _Links:
    parser = _Links()
    parser.feed(html)
    return parser


@pytest.fixture(scope="module")
def server():
    # An API key is set: the docs must still open without one (they are not inference routes).
    with ThreadServer(FakeEngine(), api_key="secret") as running:
        yield running


@pytest.mark.parametrize("page", PAGES)
def test_page_links_only_to_the_service_itself(server: ThreadServer, page: str) -> None:
    with server.client() as client:
        answer = client.get(page)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/html")
        found = _parse(answer.text)
        assert found.links, "no src/href at all: the page cannot load its UI"
        for link in found.links:
            parts = urlsplit(link)
            assert not parts.scheme and not parts.netloc, f"{page} loads {link} from elsewhere"
        for script in found.scripts:
            # jsdelivr, unpkg, Google Fonts: any absolute URL in inline JS would leave the cluster.
            assert "http://" not in script and "https://" not in script, script[:200]
        for link in found.links:
            target = urljoin(server.url + page, link)
            asset = client.get(target)
            assert asset.status_code == 200, target
            suffix = "." + urlsplit(target).path.rsplit(".", 1)[-1]
            expected = MEDIA_TYPES.get(suffix)
            assert expected, f"{page} links {link}, of a type this test does not know"
            assert asset.headers["content-type"].split(";")[0] == expected, target
            assert len(asset.content) > 1000, f"{target} is suspiciously small"


def test_swagger_ui_gets_the_schema_and_its_redirect_page(server: ThreadServer) -> None:
    with server.client() as client:
        html = client.get("/docs").text
        assert "'/openapi.json'" in html or '"/openapi.json"' in html
        schema = client.get("/openapi.json")
        assert schema.status_code == 200 and schema.json()["info"]["title"] == "Escort Serve"
        # The docs routes are not part of the documented API.
        assert not any(p.startswith(("/docs", "/redoc")) for p in schema.json()["paths"])
        redirect = client.get("/docs/oauth2-redirect")
        assert redirect.status_code == 200 and "text/html" in redirect.headers["content-type"]


def test_only_the_named_assets_are_served(server: ThreadServer) -> None:
    with server.client() as client:
        assert client.get("/docs-assets/__init__.py").status_code == 404
        assert client.get("/docs-assets/../core.py").status_code == 404
        js = client.get("/docs-assets/swagger-ui-bundle.js")
        assert "max-age" in js.headers["cache-control"]
