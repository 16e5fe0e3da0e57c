"""The `instructrec` command: one parser, subcommands registered by each layer.

Each module in _LAYERS has `register(subparsers)`; the dispatcher imports them all, and a
layer's heavy imports (torch, onnxruntime) happen only inside the command functions.

Exit codes, the same for every command: 0 done; 2 the input or setup is wrong (any
`InstructRecError`: a bad flag value, a missing file, a model that cannot be resolved), reported
as one line on stderr that names the field and the fix, never a traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules with a register(subparsers) function, in the order shown by --help.
_LAYERS = (
    "instructrec.training.data.cli",  # data prepare | synth | stats
    "instructrec.training.instructions_cli",  # instructions templates | build
    "instructrec.training.tune_cli",  # train
    "instructrec.training.eval_cli",  # eval | eval-train-set
    "instructrec.export.cli",  # export
    "instructrec.engine.cli",  # rerank
    "instructrec.demo",  # demo
    "instructrec.bench.cli",  # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructrec",
        description="Recommendation as instruction following: data, instructions, tuning, export, reranking.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _LAYERS:
        importlib.import_module(module_name).register(sub)
    return parser


EXIT_INPUT = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("instructrec")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
