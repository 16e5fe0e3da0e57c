"""The `instructrec` dispatcher: one exit-code convention for every command, and a fast start
(no torch for --help or for commands that never score)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instructrec", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("argv", [
    ["instructions", "build", "--data", "{tmp}/no-such-data", "--out", "{tmp}/out"],
    ["train", "--instructions", "{tmp}/no-such-instructions", "--model", "random:t5-tiny", "--out", "{tmp}/run"],
    ["eval", "--data", "{tmp}/no-such-data", "--instructions", "{tmp}/none", "--out", "{tmp}/eval", "--scenario", "seq-rec",
     "--methods", "popularity"],
])
def test_input_mistakes_exit_2_with_one_line_and_no_traceback(argv, tmp_path):
    result = _run(*[a.format(tmp=tmp_path) for a in argv])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no-such" in errors[0], result.stderr


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "from instructrec.cli import build_parser\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            "        build_parser().parse_args(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr
