"""The README and docs/ say only what is true of the code: their snippets compile (the marked ones
run), their TOML parses, every `kdplug` command and flag they show exists, their links lead
somewhere, and the option tables name every option. (tests/test_example_plugin.py checks that the
README shows the example plugin's files verbatim.)"""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Set

import click
import pytest

from kdplug.cache.config import CacheConfig
from kdplug.cli import cli
from kdplug.engine.config import DistillConfig
from kdplug.settings import settings_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
RUN_MARK = "<!-- the tests run this block -->"
EXAMPLE = ROOT / "examples" / "kdplug-example-plugin" / "kdplug_example_plugin.py"


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence
    lang: str
    text: str
    run: bool  # preceded by RUN_MARK

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(lang: str) -> List[Block]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("```"):
                start, info = i, lines[i][3:].strip()
                i += 1
                body = []
                while not lines[i].startswith("```"):
                    body.append(lines[i])
                    i += 1
                marked = start > 0 and lines[start - 1].strip() == RUN_MARK
                if info == lang:
                    found.append(Block(path, start + 1, info, "\n".join(body) + "\n", marked))
            i += 1
    return found


def test_the_docs_are_found():
    names = {p.name for p in DOCS}
    assert {"README.md", "architecture.md", "op.md", "teacher-cache.md", "transformers.md",
            "plugins.md", "benchmarks.md"} <= names
    assert len(blocks("python")) >= 8 and len(blocks("sh")) >= 8
    assert sum(b.run for b in blocks("python")) >= 2


def test_the_readme_is_for_users():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 350
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:2] == ["## Install", "## Quick start"]
    assert "make demo" in lines and "make test" in lines


@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: b.where)
def test_python_snippets_compile(block):
    compile(block.text, block.where, "exec")


@pytest.mark.parametrize("block", [b for b in blocks("python") if b.run], ids=lambda b: b.where)
def test_marked_snippets_run(block, fresh_plugins):
    exec(compile(block.text, block.where, "exec"), {"__name__": "snippet"})


@pytest.mark.parametrize("block", blocks("toml"), ids=lambda b: b.where)
def test_toml_snippets_parse(block):
    tomllib.loads(block.text)


def _example_commands() -> Dict[str, click.Command]:
    """The commands the example plugin adds, read from its source (it need not be installed)."""
    spec = importlib.util.spec_from_file_location("kdplug_example_plugin_docs", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    group = click.Group()
    module.register_commands(group)
    return dict(group.commands)


def _flags(command: click.Command) -> Set[str]:
    return {flag for param in command.params for flag in param.opts + param.secondary_opts}


def _kdplug_calls(text: str) -> List[List[str]]:
    """Each `kdplug …` (or `-m kdplug …`) invocation in a shell block, as its arguments."""
    calls = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        for i, word in enumerate(words):
            if word == "kdplug" and (i == 0 or words[i - 1] == "-m" or "=" in words[i - 1]):
                args = []
                for arg in words[i + 1:]:
                    if arg in ("|", "&&", ";"):
                        break
                    args.append(arg)
                calls.append(args)
    return calls


@pytest.mark.parametrize("block", blocks("sh"), ids=lambda b: b.where)
def test_kdplug_commands_and_flags_exist(block):
    commands = {**cli.commands, **_example_commands()}
    for args in _kdplug_calls(block.text):
        if not args or args[0] in ("--version", "--help", "-h", "COMMAND"):
            continue
        name = args[0]
        assert name in commands, f"{block.where}: no command `kdplug {name}`"
        known = _flags(commands[name]) | {"--help", "-h"}
        for arg in args[1:]:
            flag = arg.split("=", 1)[0]
            if flag.startswith("-") and flag not in ("-", "…"):
                assert flag in known, f"{block.where}: `kdplug {name}` has no option {flag}"


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> Set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_lead_somewhere(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.name}: link to {target} leads nowhere"
        if anchor:
            assert anchor in _anchors(resolved), f"{path.name}: no heading for {target}"


@pytest.mark.parametrize("doc, config", [("distill.md", DistillConfig),
                                         ("teacher-cache.md", CacheConfig)])
def test_option_tables_name_every_option(doc, config):
    text = (ROOT / "docs" / doc).read_text()
    shown = set(re.findall(r"`[^`]*?(--[a-z][a-z-]*)", text))
    shown |= {f for span in re.findall(r"`([^`]*)`", text) for f in re.findall(r"--[a-z-]+", span)}
    for item in settings_of(config):
        negated = "--no-" + item.long_flag[2:]
        assert item.long_flag in shown or negated in shown, f"{doc} does not name {item.long_flag}"
