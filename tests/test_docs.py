"""The docs (README.md and docs/*.md) against the code: every code block that claims to run is
run or checked, every module path and file they name exists, the configuration reference is
what docs/gen_config.py writes, and MkDocs builds the site with --strict.

A fenced code block says what it claims on the line before it:

    <!-- docs: example GROUP/NAME -->  file NAME of a worked example, written with the rest of
                                       GROUP into one directory and run there as a user runs it
                                       (tests/test_docs_env.py; NAME "command": the command line)
    <!-- docs: toml -->                a run config or part of one: loaded by rlpipe.pipeline.config.load
    <!-- docs: python -->              compiled, and its top-level imports run
    <!-- docs: run-python -->          run as a script in an empty directory
    <!-- docs: cli -->                 each rlpipe command parsed by rlpipe's own argument parser
                                       (nothing runs), its --set keys checked against the config
    <!-- docs: shown: WHY -->          not run; WHY says what it is (another tool's command, ...)

A block tagged `text` (output, a diagram, a file tree) claims nothing and needs no marker.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import msgspec
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- docs: (example \S+/\S+|toml|python|run-python|cli|shown: .+?) -->")
EXAMPLES = {"myenv": "tests/test_docs_env.py", "readme": "tests/test_docs_env.py"}
"""Each example group and the test file that runs it."""


@dataclass
class Block:
    page: Path
    line: int  # 1-based, of the opening fence
    lang: str
    claim: str | None  # what the marker says, None without one
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page.name}:{i + 1}: a code block that is never closed"
        marker = MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
        indent = len(fence.group(1))
        body = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        found.append(Block(page, i + 1, fence.group(2), marker.group(1) if marker else None, body))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in page_blocks(page)]


def claimed(kind: str) -> list[Block]:
    return [b for b in ALL if b.claim == kind]


def ids(blocks: list[Block]) -> list[str]:
    return [b.where for b in blocks]


def example_files(group: str) -> dict[str, str]:
    """{NAME: body} of an example group, in the order the pages give them."""
    return {b.claim.split("/", 1)[1]: b.body for b in ALL
            if b.claim and b.claim.startswith(f"example {group}/")}


def test_every_code_block_says_what_it_claims():
    assert len(ALL) > 30, "the pages have fewer code blocks than they did: is the parser still right?"
    for block in ALL:
        assert block.lang, f"{block.where}: give the block a language (text for output)"
        if block.lang == "text":
            assert block.claim is None, f"{block.where}: a text block claims nothing; tag it with its language"
            continue
        assert block.claim, (f"{block.where}: a {block.lang} block needs a marker on the line before it "
                             f"(<!-- docs: toml|python|run-python|cli|example G/NAME|shown: why -->)")
        if block.claim.startswith("example "):
            group = block.claim.split()[1].split("/")[0]
            assert group in EXAMPLES, f"{block.where}: example group {group!r} is run by no test (EXAMPLES)"


def test_no_marker_is_left_without_its_block():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if "<!-- docs:" in line:
                assert MARKER.fullmatch(line.strip()), f"{page.name}:{i + 1}: not a marker this test knows: {line}"
                assert i + 1 < len(lines) and lines[i + 1].lstrip().startswith("```"), \
                    f"{page.name}:{i + 1}: a marker must be right above its code block"


# --------------------------------------------------------------------------- TOML and Python


@pytest.mark.parametrize("block", claimed("toml"), ids=ids(claimed("toml")))
def test_toml_block_is_a_valid_run_config(block, tmp_path):
    from rlpipe.pipeline.config import load

    path = tmp_path / "block.toml"
    path.write_text(block.body)
    load(path)  # raises ValueError naming the key that is wrong


@pytest.mark.parametrize("block", claimed("python"), ids=ids(claimed("python")))
def test_python_block_compiles_and_imports(block):
    tree = ast.parse(block.body, filename=block.where)  # a SyntaxError names the line
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imports, f"{block.where}: a snippet with no import shows nothing that could break"
    for node in imports:
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
            continue
        module = importlib.import_module(node.module)
        for alias in node.names:  # a name the module defines, or a submodule of it
            assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                f"{block.where}: {node.module} has no {alias.name}"


@pytest.mark.slow
@pytest.mark.parametrize("block", claimed("run-python"), ids=ids(claimed("run-python")))
def test_python_block_runs(block, tmp_path):
    (tmp_path / "snippet.py").write_text(block.body)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, f"{block.where}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


# --------------------------------------------------------------------------- command lines


class Parsed(Exception):
    """Raised in place of running a command, once its arguments are parsed."""


def parse(entry, argv: list[str], where: str) -> argparse.Namespace:
    """argv as `entry` (a main(argv) that builds an argparse parser) parses it; nothing runs."""
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    errors = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), contextlib.redirect_stderr(errors):
        try:
            entry(argv)
        except Parsed as done:
            return done.args[0]
        except SystemExit:
            pass
    pytest.fail(f"{where}: {shlex.join(argv)} is refused by the parser: {errors.getvalue().strip()}")


def config_keys() -> set[str]:
    from rlpipe.pipeline.config import RunConfig

    keys = set()

    def walk(info, prefix: str) -> None:
        for field in info.fields:
            t = field.type.type if isinstance(field.type, msgspec.inspect.Metadata) else field.type
            if isinstance(t, msgspec.inspect.StructType):
                walk(t, f"{prefix}{field.name}.")
            else:
                keys.add(prefix + field.name)

    walk(msgspec.inspect.type_info(RunConfig), "")
    return keys


def commands(body: str) -> list[list[str]]:
    """The commands of a shell block: comments, line continuations, `&&`, a trailing `&` and
    the brackets of optional arguments (`[--resume]`) taken apart."""
    text = body.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip().rstrip("&").strip()
        for part in line.split("&&"):
            words = shlex.split(part.replace("[", " ").replace("]", " "))
            if words:
                out.append(words)
    return out


def check_command(words: list[str], where: str) -> bool:
    """Parse an rlpipe command (True), or check that what another command names exists."""
    from rlpipe.cli.main import main as rlpipe_main
    from rlpipe.loop import main as loop_main

    if words[0].endswith("/rlpipe") or words[0] == "rlpipe":
        args = parse(rlpipe_main, words[1:], where)
        known = config_keys()
        for item in getattr(args, "set", []):
            key = item.partition("=")[0]
            assert key in known, f"{where}: --set {key}: the config has no such key"
        config = getattr(args, "config", None)
        if config and (ROOT / config).is_file():  # a config of the repository: loaded with the overrides
            from rlpipe.cli.main import _parse_sets
            from rlpipe.pipeline.config import load

            load(ROOT / config, _parse_sets(list(args.set)))
        return True
    if words[:3] == ["python", "-m", "rlpipe.loop"] or words[:3] == [".venv/bin/python", "-m", "rlpipe.loop"]:
        parse(loop_main, words[3:], where)
        return True
    if words[0] == "torchrun":
        assert words[words.index("-m") + 1] == "rlpipe.cli", where
        parse(rlpipe_main, words[words.index("-m") + 2:], where)
        return True
    if words[0] in ("bash",) or (words[0].endswith("python") and words[1].endswith(".py")):
        script = words[1]
        if script.startswith((".ci/", "examples/", "benchmarks/")):
            assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
        return False
    if words[0].endswith("python") and words[1:3] == ["-m", "pytest"]:
        return True  # .ci/run runs it (test_ci_runs_the_readme_test_command)
    assert words[0] == "export", f"{where}: {words[0]!r} is a command this test does not know; mark the block shown"
    return False


@pytest.mark.parametrize("block", claimed("cli"), ids=ids(claimed("cli")))
def test_command_lines_parse(block):
    lines = commands(block.body)
    assert lines, f"{block.where}: no command in a cli block"
    parsed = [check_command(words, block.where) for words in lines]
    assert any(parsed), f"{block.where}: no rlpipe command in a cli block"


def test_a_bad_flag_or_key_is_caught():
    """The checks above can fail: a flag the parser lacks and a --set key the config lacks."""
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --steps"):
        check_command(["rlpipe", "run", "x.toml", "--steps", "3"], "here")
    with pytest.raises(AssertionError, match="no such key"):
        check_command(["rlpipe", "run", "x.toml", "--set", "explorer.device=cuda:1"], "here")
    assert check_command(["rlpipe", "run", "x.toml", "--set", "explorer.engine.device=cuda:1"], "here")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = "bash .ci/setup && .venv/bin/python -m pytest -q"
    assert f"```bash\n{command}\n```" in readme
    assert "```bash\nbash .ci/setup && .venv/bin/rlpipe demo\n```" in readme
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


# --------------------------------------------------------------------------- names and links


def resolve(dotted: str):
    """The object a dotted name such as rlpipe.training.lora.SharedBase names."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and not name.startswith(err.name):  # the module exists, an import in it failed
                raise
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_module_path_and_file_the_docs_name_exists():
    names, files = set(), set()
    for page in PAGES:
        text = page.read_text()
        names |= {m.rstrip(".") for m in re.findall(r"(?<![\w/.])(?:rlpipe|envs)(?:\.\w+)+", text)}
        files |= set(re.findall(r"(?<![\w/.])(?:rlpipe|envs|examples|benchmarks|tests|docs)/[\w/.*-]*[\w*]", text))
    assert "rlpipe.pipeline.debug.debug_group" in names and "rlpipe/pipeline/config.py" in files
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as err:
            missing.append(f"{name} ({type(err).__name__}: {err})")
    missing += [f for f in sorted(files) if not list(ROOT.glob(f))]  # tests/test_families*.py: a pattern
    assert not missing, "the docs name what does not exist:\n" + "\n".join(missing)


def test_readme_links_reach_their_pages():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert "docs/env.md" in links
    for link in links:
        if not link.startswith(("http://", "https://")):
            assert (ROOT / link).exists(), f"README.md links to {link}, which does not exist"


def test_readme_stays_a_landing_page():
    assert len((ROOT / "README.md").read_text().splitlines()) < 200


# --------------------------------------------------------------------------- generated page, site


def generator():
    spec = importlib.util.spec_from_file_location("gen_config", ROOT / "docs" / "gen_config.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def test_config_reference_is_current():
    text = generator().render()
    from rlpipe.pipeline.config import LearnerConfig

    assert "### `learner.kl_coef`" in text and LearnerConfig.__struct_fields__[0] in text
    assert (ROOT / "docs" / "config.md").read_text() == text, \
        "docs/config.md is not what docs/gen_config.py writes from rlpipe/pipeline/config.py: run python docs/gen_config.py"


def test_every_new_config_field_has_a_docstring():
    missing = set(generator().undocumented())
    assert not missing, (f"config fields without a docstring: {sorted(missing)}; the "
                                     "configuration reference is generated from them (rlpipe/pipeline/config.py)")


def test_config_reference_lists_every_key():
    text = (ROOT / "docs" / "config.md").read_text()
    listed = set(re.findall(r"^### `([\w.]+)`$", text, re.MULTILINE))
    assert listed == config_keys()


@pytest.mark.slow
def test_mkdocs_builds_the_site_strictly(tmp_path):
    for package in ("mkdocs", "material"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install -e .[docs])")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for page in ("index", "env", "config", "loop", "tinker", "scaling"):
        built = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), built
    assert "learner.kl_coef" in (tmp_path / "site" / "config" / "index.html").read_text()
