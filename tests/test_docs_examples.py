"""The examples in README.md and docs/**/*.md run, and their links lead somewhere.

Every fenced ```python, ```bash, ```sh or ```console block is run, unless the HTML comments on
the lines directly above its fence say otherwise. Those comments:

- ``<!-- not run: REASON -->``: not run, and why (installs packages, needs a GPU, takes minutes).
- ``<!-- file: NAME -->``: the block (``toml`` and the like) is written to NAME in the folder
  where the page's examples run.
- ``<!-- produces: STATE -->``: the folder this block ran in is kept, as STATE;
  ``<!-- setup: STATE -->``: the block runs in a copy of it (the producer runs first).
- ``<!-- expect: TEXT -->``: TEXT is in the block's output (stdout and stderr).

A block runs in a temporary folder holding a copy of ``studies/`` and the page's ``file:``
blocks: Python with this interpreter, shell with ``bash -euo pipefail`` (``autofinetune`` on
PATH; from a ``console`` block only its ``$ `` lines), on the CPU. Every block names its
language (```text for output); ``toml`` blocks parse, and those without a ``name`` parse as
a part of a study spec.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT, cli_env

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
RUN = {"python", "bash", "sh", "console"}
MARKERS = {"not run", "file", "produces", "setup", "expect"}
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)\s*$")
COMMENT = re.compile(r"^<!--\s*(.*?)\s*-->$")
BLOCK_TIMEOUT = 300
#: Variables that would point an example at another study database, artifact store or log file.
UNSET = ("AUTOFINETUNE_STORAGE", "OPTUNA_STORAGE", "AUTOFINETUNE_ARTIFACTS", "AUTOFINETUNE_RAY_STORAGE",
         "AUTOFINETUNE_LOG_FILE", "AUTOFINETUNE_LOG_LEVEL")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    markers: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"

    def marker(self, key: str) -> list[str]:
        return [value for k, value in self.markers if k == key]

    @property
    def runs(self) -> bool:
        return self.lang in RUN and not self.marker("not run")


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if not opening:
            i += 1
            continue
        fence, indent = opening.group(1), len(lines[i]) - len(lines[i].lstrip())
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        markers, above = [], i - 1
        while above >= 0 and (comment := COMMENT.match(lines[above].strip())):
            key, _, value = comment.group(1).partition(":")
            markers.insert(0, (key.strip(), value.strip()))
            above -= 1
        code = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        blocks.append(Block(page, i + 1, opening.group(2).lower(), code, tuple(markers)))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in _blocks(page)]
RUNNABLE = [block for block in BLOCKS if block.runs]


def test_the_pages_have_examples_and_every_block_is_run_or_says_why_not():
    assert (REPO_ROOT / "README.md") in PAGES and RUNNABLE
    wrong = []
    for block in BLOCKS:
        if not block.lang:
            wrong.append(f"{block.name}: a fenced block without a language (```text for output)")
        for key, value in block.markers:
            if key not in MARKERS:
                wrong.append(f"{block.name}: unknown marker <!-- {key}: {value} -->")
            elif not value:
                wrong.append(f"{block.name}: <!-- {key}: --> needs a value (a reason, a name, a text)")
        if block.lang in RUN and block.marker("not run") and len(block.markers) > 1:
            wrong.append(f"{block.name}: a block that is not run takes no other marker")
        for state in block.marker("setup"):
            if _producer(block.page, state) is None:
                wrong.append(f"{block.name}: no block of {block.page.name} produces {state!r}")
    assert not wrong, "\n".join(wrong)


# --- running the examples -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory) -> Path:
    """``autofinetune`` and ``python`` as this interpreter runs them, whatever else is installed."""
    folder = tmp_path_factory.mktemp("bin")
    for name, command in (("autofinetune", f'"{sys.executable}" -m autofinetune.cli'), ("python", f'"{sys.executable}"')):
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        script.chmod(0o755)
    return folder


def _env(bin_dir: Path) -> dict[str, str]:
    env = cli_env()
    for name in UNSET:
        env.pop(name, None)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the same, fast CPU run on any machine
    return env


def _fresh_folder(page: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copytree(REPO_ROOT / "studies", folder / "studies")
    for block in _blocks(page):
        for name in block.marker("file"):
            (folder / name).write_text(block.code)
    return folder


def _producer(page: Path, state: str) -> Block | None:
    return next((block for block in _blocks(page) if state in block.marker("produces")), None)


def _run(block: Block, folder: Path, bin_dir: Path) -> str:
    if block.lang == "python":
        script = folder / "_docs_example.py"
        script.write_text(block.code)
        args = [sys.executable, script.name]
    else:
        code = block.code
        if block.lang == "console":
            code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ ")) + "\n"
        args = ["bash", "-euo", "pipefail", "-c", code]
    out = subprocess.run(args, cwd=folder, env=_env(bin_dir), capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    output = out.stdout + out.stderr
    assert out.returncode == 0, f"{block.name} exited with {out.returncode}:\n{block.code}\n{output[-4000:]}"
    missing = [text for text in block.marker("expect") if text not in output]
    assert not missing, f"{block.name}: {missing} not in its output:\n{output[-4000:]}"
    return output


#: (page, state) -> the folder its producing block left; a failed producer is remembered.
_STATES: dict[tuple[Path, str], Path | Exception] = {}


def _state(page: Path, state: str, tmp_path_factory, bin_dir: Path) -> Path:
    key = (page, state)
    if key not in _STATES:
        producer = _producer(page, state)
        assert producer is not None, f"no block of {page.name} produces {state!r}"
        folder = _fresh_folder(page, tmp_path_factory.mktemp(state) / "work")
        try:
            _run(producer, folder, bin_dir)
            _STATES[key] = folder
        except Exception as error:  # the blocks that set up from it fail with its reason
            _STATES[key] = error
            raise
    found = _STATES[key]
    if isinstance(found, Exception):
        pytest.fail(f"the block that produces {state!r} failed: {found}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_example_runs(block: Block, tmp_path, tmp_path_factory, bin_dir):
    produces = block.marker("produces")
    if produces:
        _state(block.page, produces[0], tmp_path_factory, bin_dir)
        return
    folder = tmp_path / "work"
    setups = block.marker("setup")
    if setups:
        shutil.copytree(_state(block.page, setups[0], tmp_path_factory, bin_dir), folder)
    else:
        _fresh_folder(block.page, folder)
    _run(block, folder, bin_dir)


TOML = [block for block in BLOCKS if block.lang == "toml"]


@pytest.mark.parametrize("block", TOML, ids=[block.name for block in TOML])
def test_toml_example_parses(block: Block, tmp_path):
    data = tomllib.loads(block.code)
    if "name" not in data:  # a part of a spec: its fields and values are the spec's
        from autofinetune import parse_spec

        parse_spec({"name": "example", **data}, base_dir=tmp_path, origin=block.name)


# --- links --------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"^(`{3,}|~{3,}).*?^\1\s*$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`[^`]*`")


def _prose(page: Path) -> str:
    """The page without its code blocks and code spans."""
    return INLINE.sub("", FENCED.sub("", page.read_text()))


def _anchors(page: Path) -> set[str]:
    """GitHub's ids of the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCED.sub("", page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO_ROOT)) for page in PAGES])
def test_relative_links_lead_to_a_file_and_heading(page: Path):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO_ROOT)}")
    assert not broken, f"{page.relative_to(REPO_ROOT)}:\n" + "\n".join(broken)


def test_the_readme_benchmark_list_quotes_its_pages():
    """Each number of a README benchmark line is on the page it links to."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^- \[[^\]]+\]\((docs/benchmarks/[\w.]+)\):(.*?)(?=^- |\Z)", section, re.MULTILINE | re.DOTALL)
    assert entries
    number = re.compile(r"(?<![\w.,])\d+(?:,\d{3})*(?:\.\d+)?")
    wrong = []
    for link, text in entries:
        page = (REPO_ROOT / link).read_text()
        on_page = set(number.findall(page))
        wrong += [f"{link}: {n}" for n in number.findall(text) if n not in on_page]
    assert not wrong, "numbers in the README's Benchmarks list that their page does not have:\n" + "\n".join(wrong)
