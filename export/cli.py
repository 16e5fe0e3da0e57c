"""`instructrec export`: a model (folder, Hub id or random:<shape>) -> an engine ONNX directory,
validated.

Exit codes: 0 exported and validated; 1 validation found mismatches (listed on stderr, the
report is in OUT/validation.json, no manifest is written); 2 the export could not start or run
(a model that cannot be resolved, an export folder given as --model, a non-empty output folder,
bf16 on CPU), with the message on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)

EXIT_VALIDATION = 1
EXIT_INPUT = 2


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a T5 model to ONNX (Optimum) for the engine's onnx backend, validated",
        description="Export a T5 / Flan-T5 model to the four ONNX graphs the engine runs (encoder, cross-attention "
                    "K/V, packed decoder, LM head with log-softmax-gather), validate onnxruntime against torch, and "
                    "write a manifest and a validation report.")
    parser.add_argument("--model", required=True,
                        help="a save_pretrained folder, a Hugging Face Hub id (e.g. google/flan-t5-base), or "
                             "random:<shape> (RANDOM weights, for speed and memory work; needs --tokenizer)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model (Hub ids only)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or Hub id (default: the checkpoint's own; required with random:)")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="graph precision; bfloat16 needs --device cuda (onnxruntime's CPU provider has no bf16 kernels)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    parser.add_argument("--atol", type=float, default=None,
                        help="validation tolerance on max |onnx - torch| / max(1, max |torch|) (default 1e-4 fp32, 3e-2 bf16)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device for the export trace and for validation")
    parser.add_argument("--with-generation-graphs", action="store_true",
                        help="also write Optimum's standard seq2seq graphs (encoder_model.onnx, decoder_model.onnx, "
                             "decoder_with_past_model.onnx) in the same folder, so that "
                             "optimum's ORTModelForSeq2SeqLM loads it and generate() works (validated by greedy "
                             "generation against transformers)")
    parser.add_argument("--seed", type=int, default=0, help="weights of a random:<shape> model (default 0)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from instructrec.engine.errors import InstructRecError

    from .errors import ExportValidationError
    from .exporter import export_model

    try:
        manifest = export_model(args.model, args.out, revision=args.revision, tokenizer=args.tokenizer,
                                dtype=args.dtype, opset=args.opset, atol=args.atol, validation_device=args.device,
                                with_generation_graphs=args.with_generation_graphs, seed=args.seed)
    except ExportValidationError as e:
        print(f"instructrec export: validation failed: {e}", file=sys.stderr)
        return EXIT_VALIDATION
    except InstructRecError as e:
        print(f"instructrec export: {e}", file=sys.stderr)
        return EXIT_INPUT
    summary = {"out": args.out, "source": manifest["source"], "random_weights": manifest["random_weights"],
               "dtype": manifest["dtype"], "opset": manifest["opset"],
               "graphs": {k: v["file"] for k, v in manifest["graphs"].items()},
               "generation_graphs": manifest["generation_graphs"],
               "export_seconds": manifest["export_seconds"], "validation_seconds": manifest["validation_seconds"]}
    print(json.dumps(summary, indent=2))
    return 0
