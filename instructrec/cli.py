"""The `instructrec` command: one parser, subcommands registered by each layer.

Each module in _LAYERS has `register(subparsers)`; the dispatcher imports them all, and a
layer's heavy imports (torch, onnxruntime) happen only inside the command functions.
Commands outside the product (`bench`) register themselves through the entry-point group
`instructrec.commands` (pyproject.toml), whose values are such `register` functions: the product
never names them, and loads them only when the command line asks for one of them (or for the
command list), so `instructrec rerank` never imports the benchmarks.

Exit codes, the same for every command: 0 done; 2 the input or setup is wrong (any
`InstructRecError`: a bad flag value, a missing file, a model that cannot be resolved), reported
as one line on stderr that names the field and the fix, never a traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys

# Modules with a register(subparsers) function, in the order shown by --help.
_LAYERS = (
    "instructrec.training.data.cli",  # data prepare | synth | stats
    "instructrec.training.instructions_cli",  # instructions templates | build
    "instructrec.training.tune_cli",  # train
    "instructrec.training.eval_cli",  # eval | eval-train-set | mine-negatives
    "instructrec.export.cli",  # export
    "instructrec.engine.cli",  # rerank
    "instructrec.demo",  # demo
)
# Entry points whose value is a register(subparsers) function of a command outside the product.
COMMAND_GROUP = "instructrec.commands"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser. `argv`: the command line about to be parsed; when it names a product
    command, the registered outside commands are not loaded (without it, all are: --help lists them)."""
    parser = argparse.ArgumentParser(
        prog="instructrec",
        description="Recommendation as instruction following: data, instructions, tuning, export, reranking.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _LAYERS:
        importlib.import_module(module_name).register(sub)
    command = next((a for a in (argv or []) if not a.startswith("-")), None)
    if command is None or command not in sub.choices:
        for entry_point in importlib.metadata.entry_points(group=COMMAND_GROUP):
            entry_point.load()(sub)
    return parser


EXIT_INPUT = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("instructrec")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from instructrec.engine.errors import InstructRecError

    try:
        result = args.func(args)
    except InstructRecError as exc:
        # Expected failures of user input or setup: the message names the field and the fix.
        log.debug("%s failed", args.command, exc_info=True)
        log.error("%s", exc)
        return EXIT_INPUT
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
