"""The README's Python examples run as written, and its commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_commands[0] in ci.splitlines()


def test_readme_is_a_front_door():
    """Regression: the README had grown to 1,130 lines of tuning notes; it stays short."""
    assert len(README.splitlines()) <= 250


def test_readme_links_to_files_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert local, "the README links nowhere into the docs"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing


def test_docs_pages_link_only_to_existing_pages():
    """The docs' Markdown links resolve in the source tree too (GitHub renders them there)."""
    missing = []
    for page in (ROOT / "docs").rglob("*.md"):
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in link and not (page.parent / link).exists():
                missing.append(f"{page.relative_to(ROOT)}: {link}")
    assert not missing
