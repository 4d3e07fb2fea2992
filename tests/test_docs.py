"""The README and docs/ as a reader follows them: every link leads somewhere,
every `recovery` command and option they name exists, and the lists they
keep (settings, Stripe events) match the code."""

from __future__ import annotations

import re
import shlex

import click
import pytest

from .conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_HEADING = re.compile(r"^#+\s+(.*)$", re.M)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def commands_in(text: str) -> list[str]:
    """Every `recovery …` command line in code blocks and code spans."""
    found = []
    for block in re.findall(r"```(?:sh|bash)?\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for part in re.split(r"&&|;|\|(?= )", line.split("#", 1)[0]):
                part = part.strip().removeprefix("$ ")
                part = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", part)
                if part.startswith("recovery "):
                    found.append(part)
    for span in _CODE_SPAN.findall(re.sub(r"```.*?```", "", text, flags=re.S)):
        span = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", span.strip())
        if span.startswith("recovery "):
            found.append(span)
    return found


def check_command(line: str) -> None:
    """Walk the command's words down the CLI; every option must be one the
    command it reaches accepts. Placeholders (<id>, ISO, …) are arguments."""
    from recovery.cli import cli

    try:
        words = shlex.split(line.replace("\\|", "|"))
    except ValueError:
        words = line.replace("\\|", "|").split()
    command: click.Command = cli
    for word in words[1:]:
        word = word.strip("[]")
        if not word or word in ("…", "...", "|"):
            continue
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            known = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
            assert option in known, f"{line!r}: {option} is not an option of {command.name}"
            continue
        if isinstance(command, click.Group):
            names = word.split("|")
            subs = [command.get_command(click.Context(command), n) for n in names]
            if all(subs) and subs:
                command = subs[0]
                continue
            if command is cli:
                raise AssertionError(f"{line!r}: no command {word!r}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_leads_somewhere(page):
    text = page.read_text()
    for target in _LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        assert where.exists(), f"{page.name}: {target} leads nowhere"
        if anchor and where.suffix == ".md":
            anchors = {_anchor(h) for h in _HEADING.findall(where.read_text())}
            assert anchor in anchors, f"{page.name}: no heading #{anchor} in {where.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_named_exists_with_its_options(page):
    text = page.read_text()
    for line in commands_in(text):
        check_command(line)
    for script in re.findall(r"python (bench/\w+\.py)", text):
        assert (ROOT / script).is_file(), f"{page.name}: {script} does not exist"


def test_the_command_check_can_fail():
    with pytest.raises(AssertionError):
        check_command("recovery stats --nonsense")
    with pytest.raises(AssertionError):
        check_command("recovery statz")
    check_command("recovery cases list --status open --json")


def test_the_readme_says_what_it_is_first_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    opening = readme.split("```", 1)[0]
    assert "failed subscription payments" in opening and "Stripe" in opening
    assert "Python 3.11" in opening
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    assert blocks[0].strip().endswith("pip install -e . && recovery demo")
    assert blocks[1].strip().endswith('pip install -e ".[test]" && pytest')
    # CI runs the README's test command.
    assert blocks[1].strip() in (ROOT / ".ci" / "run").read_text().replace(" -q ", " ")
    assert len(readme.splitlines()) <= 120
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"the README does not lead to {page.name}"


def test_the_configuration_page_lists_every_setting_the_code_reads():
    code = (ROOT / "recovery" / "config.py").read_text()
    read = set(re.findall(r'env(?:\.get)?\(\s*"([A-Z][A-Z0-9_]+)"', code))
    read |= set(re.findall(r'\(env, "([A-Z][A-Z0-9_]+)"', code))
    assert len(read) > 30
    page = (ROOT / "docs" / "configuration.md").read_text()
    example = (ROOT / ".env.example").read_text()
    missing = sorted(n for n in read if f"`{n}`" not in page or f"\n{n}=" not in example)
    assert not missing, missing


def test_the_stripe_events_table_is_the_handlers():
    from recovery.engine.events import HANDLERS

    page = (ROOT / "docs" / "how-it-works.md").read_text()
    table = page[page.index("## The Stripe events it reads") :]
    named = set(re.findall(r"`([a-z_]+\.[a-z_.]+)`", table.split("\n\n", 2)[1]))
    assert named == set(HANDLERS)
