"""The documentation site builds strictly, links only to pages and files that exist, loads
nothing from the network, and renders in headless Chromium.

Needs the ``docs`` extra (mkdocs-material, mkdocstrings) and ``chromium``; each test skips with
the reason when one is missing, unless ``BNORM_REQUIRE_CHROMIUM=1`` (CI), which makes a missing
tool a failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("BNORM_REQUIRE_CHROMIUM") == "1"


def _missing(what: str) -> None:
    if REQUIRED:
        pytest.fail(f"{what} (BNORM_REQUIRE_CHROMIUM=1 requires it)")
    pytest.skip(what)


class _Page(HTMLParser):
    """The parts of a built page the checks read: links, sources, ids, title, headings."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []  # href of <a> and <link>
        self.sources: list[str] = []  # src of <img>, <script>, <iframe>, ...
        self.stylesheets: list[str] = []
        self.ids: set[str] = set()
        self.title = ""
        self.h1 = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "name" in a:
            self.ids.add(a["name"])
        if "href" in a and tag in ("a", "link"):
            self.links.append(a["href"])
            if tag == "link" and "stylesheet" in a.get("rel", ""):
                self.stylesheets.append(a["href"])
        if "src" in a:
            self.sources.append(a["src"])
        if tag in ("title", "h1"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.title += data
        elif self._in == "h1":
            self.h1 += data.replace("¶", "")  # the permalink anchor's text


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _is_external(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.scheme or parts.netloc) or url.startswith("//")


def _target(page: Path, url: str, site: Path) -> tuple[Path, str]:
    """The file a local link points to (a folder means its index.html), and its fragment."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    if not path:
        target = page
    elif path.startswith("/"):  # root-relative (404.html): from the site's root
        target = (site / path.lstrip("/")).resolve()
    else:
        target = (page.parent / path).resolve()
    if target.is_dir() or path.endswith("/"):
        target = target / "index.html"
    return target, unquote(parts.fragment)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("mkdocs") is None:
        _missing("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def _nav_pages() -> list[str]:
    """The Markdown files named in mkdocs.yml's nav, in order."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may hold !!python/name tags (pymdownx); they are not needed here
    _Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)

    def walk(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in walk(item)]
        if isinstance(node, dict):
            return [p for value in node.values() for p in walk(value)]
        return []

    return walk(config["nav"])


def _built(site: Path, md: str) -> Path:
    return site / (md.removesuffix(".md") + ".html")  # use_directory_urls: false


def test_every_nav_page_is_built_with_a_title_and_a_heading(site):
    pages = _nav_pages()
    assert len(pages) >= 15
    for md in pages:
        assert (ROOT / "docs" / md).is_file(), md
        built = _built(site, md)
        assert built.is_file(), md
        page = _parse(built)
        assert page.title.strip().endswith("bnorm"), (md, page.title)
        assert page.h1.strip(), f"{md} has no heading"


def test_local_links_and_images_resolve(site):
    """Every local href and src of every built page points to a file that exists, and every
    fragment to an id on the target page (API anchors included)."""
    broken = []
    pages = {p: _parse(p) for p in site.rglob("*.html")}
    for path, page in pages.items():
        for url in [*page.links, *page.sources]:
            if _is_external(url) or url.startswith(("mailto:", "data:", "javascript:")):
                continue
            target, fragment = _target(path, url, site)
            if not target.exists():
                broken.append(f"{path.relative_to(site)}: {url}")
            elif fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if fragment not in ids:
                    broken.append(f"{path.relative_to(site)}: {url} (no id {fragment!r})")
    assert not broken, "\n".join(broken[:50])


def test_the_site_loads_nothing_from_the_network(site):
    """Fonts, scripts, styles and images are all local: the site is read offline."""
    remote = []
    for path in site.rglob("*.html"):
        page = _parse(path)
        remote += [f"{path.relative_to(site)}: {u}" for u in [*page.sources, *page.stylesheets]
                   if _is_external(u)]  # fmt: skip
    for css in site.rglob("*.css"):
        text = css.read_text(encoding="utf-8", errors="replace")
        if "fonts.googleapis" in text or "@import url(http" in text:
            remote.append(str(css.relative_to(site)))
    assert not remote, "\n".join(remote[:50])


def test_the_api_reference_shows_the_docstrings(site):
    text = (site / "api" / "bnorm.html").read_text(encoding="utf-8")
    for name in ("bnorm.BatchNorm2d", "bnorm.BatchRenorm2d", "bnorm.SyncBatchNorm"):
        assert f'id="{name}"' in text, name
    assert "drop-in for" in text  # BatchNorm2d's own docstring, composed at import time


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def test_pages_render_in_headless_chromium(site, tmp_path):
    """Each page, opened from disk, renders its title, heading and navigation, and its scripts
    raise nothing in the console."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        _missing("chromium is not installed (apt-get install chromium)")
    for md in _nav_pages():
        built = _built(site, md)
        done = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
             built.as_uri()],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (md, done.stderr[-2000:])
        dom = done.stdout
        page, rendered = _parse(built), _Page()
        rendered.feed(dom)
        assert rendered.title == page.title, md
        assert rendered.h1.split() == page.h1.split() != [], md
        assert 'class="md-nav' in dom and 'class="md-header' in dom, md
        console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
        errors = [line for line in console if "Uncaught" in line or "Error" in line]
        assert not errors, (md, errors)
