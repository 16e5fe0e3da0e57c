"""The commands in README.md and docs/*.md run as written: each one parses with the real parser.

Every command line of a fenced shell block (backslash continuations joined, variables set earlier
in the same block expanded) is checked without running anything:
- `instructrec ...` (also `python -m instructrec`, `torchrun ... -m instructrec`, `accelerate launch
  ... -m instructrec`, `.venv/bin/instructrec`) goes through `instructrec.cli.build_parser()`, which
  includes the commands registered through entry points (`bench`); a model spelling that every
  command refuses (a bare shape name such as `t5-mini`) fails here too;
- `python -m instructrec.bench.<tool> ...` goes through that tool's own `main`, stopped right
  after its `parse_args`;
- `make TARGET` needs the target in the Makefile, `pytest PATH` needs the path;
- Python (```python blocks, and `python - <<'EOF'` bodies) must compile.
Placeholder values (DIR, requests.parquet) are fine: only the parser's verdict counts. A bare
`...` stands for "other flags": it is dropped and required flags are not demanded on that line.
A renamed flag or command, a flag given a value outside its choices, or a stale model spelling
fails this suite. The doc pages also open with the command(s) they describe.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTS = {">", ">>", "<", ">&", "<&", "&>"}
PLACEHOLDER = "PLACEHOLDER"  # what a $(command substitution) stands for


@dataclass
class Command:
    where: str  # FILE:LINE of the command's first line
    kind: str  # "instructrec", "module", "make", "pytest"
    argv: list[str]
    ellipsis: bool = False  # the line used `...` for "other flags"
    module: str = ""


@dataclass
class Snippet:
    where: str
    code: str


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info string, line number of the block's first line, lines) of every fenced block."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not match:
            i += 1
            continue
        fence, info, start = match.group(1), match.group(2).lower(), i + 1
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((info, start + 1, body))
        i += 1
    return blocks


def logical_lines(lines: list[str], first_line: int) -> list[tuple[int, str]]:
    """Join backslash continuations; returns (line number of the first physical line, text)."""
    out, pending, start = [], "", None
    for offset, line in enumerate(lines):
        if start is None:
            start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _expand(text: str, variables: dict[str, str]) -> str:
    text = re.sub(r"\$\([^()]*\)", PLACEHOLDER, text)
    text = re.sub(r"(?<=\s)\d*(?:>>?|<|&>)(?:&\d+|\s*[^\s|;&]+)", " ", text)  # > log.txt, 2>&1
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def _segments(tokens: list[str]) -> list[list[str]]:
    segments, current, skip = [], [], False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in SEPARATORS:
            segments.append(current)
            current = []
        elif token in REDIRECTS:  # one _expand left (no space before it): drop its target too
            skip = True
        else:
            current.append(token)
    segments.append(current)
    return [s for s in segments if s]


def _classify(words: list[str], where: str) -> Command | None:
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):  # FOO=bar command ...
        words = words[1:]
    if not words:
        return None
    head, rest = Path(words[0]).name, words[1:]
    if head in ("torchrun", "accelerate", "python", "python3") and "-m" in rest:
        module_at = rest.index("-m") + 1
        if module_at < len(rest):
            module, args = rest[module_at], rest[module_at + 1:]
            if module == "instructrec":
                head, rest = "instructrec", args
            elif module.startswith("instructrec."):
                return Command(where, "module", args, module=module)
            elif module == "pytest":
                return Command(where, "pytest", args)
    if head == "instructrec":
        ellipsis = "..." in rest
        return Command(where, "instructrec", [w for w in rest if w != "..."], ellipsis)
    if head == "make":
        return Command(where, "make", [w for w in rest if "=" not in w and not w.startswith("-")])
    if head == "pytest":
        return Command(where, "pytest", rest)
    return None


def extract(text: str, name: str) -> tuple[list[Command], list[Snippet]]:
    """The commands and Python snippets of one Markdown text."""
    commands, snippets = [], []
    for info, first_line, body in fenced_blocks(text):
        if info == "python":
            snippets.append(Snippet(f"{name}:{first_line}", "\n".join(body)))
            continue
        if info not in SHELL_FENCES:
            continue
        variables: dict[str, str] = {}
        lines = logical_lines(body, first_line)
        i = 0
        while i < len(lines):
            number, line = lines[i]
            i += 1
            heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
            if heredoc:  # python - <<'EOF' ... EOF: the body is Python, the line before it a command
                end, code = heredoc.group(1), []
                while i < len(lines) and lines[i][1].strip() != end:
                    code.append(lines[i][1])
                    i += 1
                i += 1
                if re.match(r"\s*(\S*/)?python3?\s+-\s", line):
                    snippets.append(Snippet(f"{name}:{number}", "\n".join(code)))
                continue
            try:
                tokens = _tokens(_expand(line, variables))
            except ValueError as e:  # unbalanced quotes: a broken command, or prose (a folder listing)
                if re.search(r"\binstructrec\b|^\s*(make|pytest|python3?|torchrun|accelerate)\s", line):
                    commands.append(Command(f"{name}:{number}", "broken", [line, str(e)]))
                continue
            assignment = re.fullmatch(r"\s*([A-Za-z_]\w*)=(.*)", line)
            if assignment and len(tokens) == 1:
                variables[assignment.group(1)] = tokens[0].partition("=")[2]
                continue
            for words in _segments(tokens):
                command = _classify(words, f"{name}:{number}")
                if command is not None:
                    commands.append(command)
    return commands, snippets


def _collect():
    commands, snippets = [], []
    for path in DOCS:
        found, code = extract(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
        commands += found
        snippets += code
    return commands, snippets


COMMANDS, SNIPPETS = _collect()
MODEL_FLAGS = ("--model", "--models")


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """None when argv parses, else argparse's message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {e.code}"
    return None


def _subparsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def strict_parser(required: bool = True) -> argparse.ArgumentParser:
    """The real parser, refusing abbreviated flags (the CLI accepts `--out` for `--output`, but a
    page that relies on it breaks as soon as another flag shares the prefix); `required=False`:
    no flag is demanded (lines with `...`)."""
    from instructrec.cli import build_parser

    parser = build_parser()
    for each in _subparsers(parser):
        each.allow_abbrev = False
        if not required:
            for action in each._actions:
                action.required = False
    return parser


def _bare_shape_names(argv: list[str]) -> list[str]:
    from instructrec.engine.presets import SHAPES

    values = []
    for flag, value in zip(argv, argv[1:]):
        if flag in MODEL_FLAGS:
            values += value.split(",")
    for word in argv:
        flag, eq, value = word.partition("=")
        if eq and flag in MODEL_FLAGS:
            values += value.split(",")
    return [v for v in values if v in SHAPES]


def _parse_module(module_name: str, argv: list[str]) -> str | None:
    """Run the tool's main(argv) until its parse_args returns, then stop it."""
    if importlib.util.find_spec(module_name) is None:
        return f"no module {module_name}"
    module = importlib.import_module(module_name)
    if not hasattr(module, "main"):
        return None

    class Parsed(BaseException):
        pass

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed()

    stderr = io.StringIO()
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            module.main(argv)
    except Parsed:
        return None
    except SystemExit as e:
        if e.code in (0, None):
            return None
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {e.code}"
    finally:
        argparse.ArgumentParser.parse_args = original
    return f"{module_name}.main returned without parsing its arguments"


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([\w.-]+)\s*:(?!=)", text, re.M)}


@pytest.fixture(scope="module")
def cli_parser():
    parser = strict_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "bench" in commands, ("the bench command is registered through the instructrec.commands entry point: "
                                 "install the package (make venv) so that its entry points exist")
    return parser


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {c.kind}" for c in COMMANDS])
def test_documented_command_parses(command, cli_parser):
    if command.kind == "broken":
        pytest.fail(f"{command.where}: cannot split the line into words ({command.argv[1]}): {command.argv[0]}")
    if command.kind == "instructrec":
        parser = strict_parser(required=False) if command.ellipsis else cli_parser
        problem = _parse(parser, command.argv)
        assert problem is None, f"{command.where}: instructrec {' '.join(command.argv)}\n  -> {problem}"
        bare = _bare_shape_names(command.argv)
        assert not bare, (f"{command.where}: --model {bare[0]} is refused by every command (a bare shape name); "
                          f"write random:{bare[0]} or a Hub id")
    elif command.kind == "module":
        problem = _parse_module(command.module, command.argv)
        assert problem is None, f"{command.where}: python -m {command.module} {' '.join(command.argv)}\n  -> {problem}"
    elif command.kind == "make":
        missing = [t for t in command.argv if t not in _make_targets()]
        assert not missing, f"{command.where}: make {' '.join(missing)}: no such target in the Makefile"
    elif command.kind == "pytest":
        paths = [w.split("::")[0] for w in command.argv if not w.startswith("-") and ("/" in w or w.endswith(".py"))]
        missing = [p for p in paths if not (ROOT / p).exists()]
        assert not missing, f"{command.where}: pytest {' '.join(missing)}: no such path in the repository"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.where for s in SNIPPETS])
def test_documented_python_compiles(snippet):
    compile(snippet.code, snippet.where, "exec")


def test_every_page_opens_with_its_commands():
    """A docs page's first block, before its first section, holds the command(s) it describes."""
    for path in sorted((ROOT / "docs").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        first_section = re.search(r"^## ", text, re.M)
        head = text[:first_section.start()] if first_section else text
        commands, _ = extract(head, path.name)
        assert commands, f"{path.relative_to(ROOT)}: no command block before its first '## ' section"


def test_every_page_is_reached_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"(docs/{p.name})" not in readme]
    assert not unlinked, f"README.md links no page {unlinked}"


def test_relative_links_resolve():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" not in target and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, "broken links: " + ", ".join(broken)


def test_extraction_reads_what_a_shell_would():
    """The extractor on a hand-written page, against the commands worked out by hand."""
    page = "\n".join([
        "```bash",
        "D=/data/x",
        "instructrec data prepare --reviews $D/a.json.gz \\",
        "    --meta $D/m.json.gz --out out   # a comment",
        "python - <<'EOF'",
        "print('instructrec rerank --not-a-command')",
        "EOF",
        "OMP_NUM_THREADS=1 .venv/bin/instructrec rerank --model m --input i --output o | tail -1",
        "torchrun --standalone --nproc_per_node 2 -m instructrec train ... --out r",
        "python -m instructrec.bench.job --rows 10 > log.txt 2>&1 && make test",
        "instructrec data prepare --reviews $(ls *.gz) --meta m --out o",
        "```",
        "```python",
        "x = 1",
        "```",
        "```yaml",
        "instructrec: ignored",
        "```",
    ])
    commands, snippets = extract(page, "page.md")
    got = [(c.where, c.kind, c.module, c.argv, c.ellipsis) for c in commands]
    assert got == [
        ("page.md:3", "instructrec", "", ["data", "prepare", "--reviews", "/data/x/a.json.gz", "--meta",
                                          "/data/x/m.json.gz", "--out", "out"], False),
        ("page.md:8", "instructrec", "", ["rerank", "--model", "m", "--input", "i", "--output", "o"], False),
        ("page.md:9", "instructrec", "", ["train", "--out", "r"], True),
        ("page.md:10", "module", "instructrec.bench.job", ["--rows", "10"], False),
        ("page.md:10", "make", "", ["test"], False),
        ("page.md:11", "instructrec", "", ["data", "prepare", "--reviews", PLACEHOLDER, "--meta", "m", "--out", "o"],
         False),
    ]
    assert [(s.where, s.code) for s in snippets] == [("page.md:5", "print('instructrec rerank --not-a-command')"),
                                                     ("page.md:14", "x = 1")]


def test_a_renamed_flag_and_a_bare_shape_name_are_caught(cli_parser):
    """The checks themselves: what they must refuse, they refuse."""
    assert _parse(cli_parser, ["rerank", "--model", "m", "--input", "i", "--output", "o"]) is None
    assert "unrecognized arguments: --out" in _parse(cli_parser, ["rerank", "--model", "m", "--input", "i",
                                                                  "--output", "o", "--out", "o"])
    assert "required: --output" in _parse(cli_parser, ["rerank", "--model", "m", "--input", "i"])
    assert _parse(strict_parser(required=False), ["rerank", "--model", "m"]) is None
    assert "invalid choice" in _parse(cli_parser, ["rerank", "--model", "m", "--input", "i", "--output", "o",
                                                   "--dtype", "float16"])
    assert _bare_shape_names(["train", "--model", "t5-mini"]) == ["t5-mini"]
    assert _bare_shape_names(["bench", "--models", "random:t5-tiny,flan-t5-base"]) == ["flan-t5-base"]
    assert _bare_shape_names(["train", "--model", "random:t5-mini"]) == []
