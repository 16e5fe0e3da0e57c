"""`instructrec rerank`: the nightly Parquet job (in-process, or on Ray Data with --ray).

Exit codes: 0 done (error rows included: they are results); 2 the job could not start (schema,
output folder, model, missing Ray) or could not write (disk full), with one line on stderr;
143 stopped by SIGTERM and 130 by Ctrl-C, saying that --resume finishes the job.
"""

from __future__ import annotations

import argparse
import logging
import signal

log = logging.getLogger(__name__)

EXIT_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as the dispatcher
EXIT_TERMINATED = 143  # 128 + SIGTERM: what a shell reports for a process killed by it


def register(subparsers) -> None:
    from .job_output import DEFAULT_CHUNK_ROWS, DEFAULT_ROWS_PER_PART

    parser = subparsers.add_parser(
        "rerank", help="rank the candidates of every request in a Parquet file or folder",
        description="Rank the candidates of every request of a requests Parquet (file or folder) into a "
                    "folder of result parts, one output row per input row, in input order. "
                    "See docs/batch-job.md for the columns, error kinds and resume semantics.")
    parser.add_argument("--model", required=True,
                        help="the model, one of: a folder (a save_pretrained checkpoint, or an `instructrec export` "
                             "folder); a Hugging Face Hub id org/name (e.g. google/flan-t5-base, fetched into the "
                             "Hugging Face cache; see --revision); random:<shape> (e.g. random:flan-t5-base: RANDOM "
                             "weights, for speed and memory work only; see --tokenizer)")
    parser.add_argument("--revision", default=None,
                        help="Hub id only: branch, tag or commit (default: main). The resolved commit is recorded in "
                             "_job.json, so --resume refuses a model that moved under the same id")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder for random:<shape> models, which carry none")
    parser.add_argument("--ensemble", action="append", default=[], metavar="MODEL",
                        help="repeatable: a further trained model (a folder or Hub id with the same tokenizer as "
                             "--model, e.g. another seed of its recipe; an export with an export) whose scores are "
                             "summed with --model's, each standardised per candidate list (docs/engine.md, "
                             "ensembles): every model scores every candidate. Recorded in _job.json: --resume "
                             "refuses other models")
    parser.add_argument("--input", required=True, help="requests: a Parquet file, or a folder of *.parquet (sorted by name)")
    parser.add_argument("--output", required=True, help="result folder (part-NNNNN.parquet, _job.json, _summary.json)")
    parser.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                        help="auto (default): onnx for an `instructrec export` folder, torch otherwise")
    parser.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "int8"), default="auto",
                        help="auto (default): bf16 on CUDA and on CPUs where it is native and measured faster, "
                             "else float32 (an ONNX export: its own dtype); int8: dynamic int8 linear layers on "
                             "CPU (opt-in; check its agreement with float32 on your model with `instructrec bench`); "
                             "--resume continues in the precision of the run it resumes")
    parser.add_argument("--exact-head", action="store_true",
                        help="torch backend: fp32 LM-head logits with bf16 weights on CPU (about +15%% CPU time, "
                             "log-probs exact to ~1e-5 instead of ~2e-2 nats per token)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the engine (torch.set_num_threads, or onnxruntime's for the "
                             "onnx backend; default: the runtime's, all cores; with --ray: --cpus-per-actor)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="engine token budget per batch (engine default if unset)")
    parser.add_argument("--group-size", type=int, default=10, help="tournament group size for long candidate lists")
    parser.add_argument("--normalize", type=_score_form, default="sum", metavar="FORM",
                        help="the score candidates are ranked by: sum (default; log P(title | instruction)), mean "
                             "(per title token), calibrated (minus the title's log-likelihood under an empty "
                             "instruction, each title scored once) or calibrated:W (minus W times it; a negative W "
                             "adds it); any of them followed by +priors:V fuses the rows' candidate_priors column "
                             "with weight V (e.g. calibrated:0.5+priors:2); `instructrec eval` writes the form that "
                             "won on validation into its metrics.json (job_normalize: the hybrid with popularity). "
                             "Recorded in _job.json: --resume keeps it")
    parser.add_argument("--compile", action="store_true",
                        help="torch backend: torch.compile the encoder and decoder (minutes of compilation "
                             "first; 1.17x candidates/s on flan-t5-base bf16 here): for long jobs")
    parser.add_argument("--resume", action="store_true",
                        help="continue a previous run into the same --output: finished parts are kept")
    parser.add_argument("--rows-per-part", type=int, default=DEFAULT_ROWS_PER_PART,
                        help=f"input rows per output part (default {DEFAULT_ROWS_PER_PART}); the unit of resume")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                        help=f"requests per engine call (default {DEFAULT_CHUNK_ROWS}); the engine packs inside it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ray = parser.add_argument_group("Ray Data (pip install 'instructrec[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="rank the parts on a pool of Ray Data actors (same parts, same output, same --resume)")
    ray.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local instance)")
    ray.add_argument("--actors", type=int, default=1,
                     help="Reranker actors (each holds the model, and every --ensemble model)")
    ray.add_argument("--gpus-per-actor", type=float, default=None,
                     help="GPUs reserved per actor; required with --device cuda (e.g. 1, or 0.5 for two per GPU)")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0,
                     help="CPUs reserved per actor (also its engine threads unless --threads)")
    ray.add_argument("--actor-restarts", type=int, default=None,
                     help="restarts of an actor whose process died, and retries of the part it was ranking "
                          "(default 3); past them the job fails and --resume continues")
    parser.set_defaults(func=_rerank)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the job unwinds: the part being written is
    discarded, the lock released, and the finished parts stay for --resume."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _device(text: str) -> str:
    """cpu, cuda or cuda:N (whether that GPU exists is checked when the engine loads)."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda or cuda:N")
    return text


def _score_form(text: str) -> str:
    """sum, mean, calibrated or calibrated:W, optionally +priors:V, checked before any work."""
    from .errors import InputError
    from .types import parse_score_form

    try:
        parse_score_form(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(f"{exc.problem} ({exc.fix})") from None
    return text


def _rerank(args: argparse.Namespace) -> int:
    from .errors import InstructRecError

    engine_options = dict(backend=args.backend, device=args.device, dtype=args.dtype,
                          batch_tokens=args.batch_tokens, group_size=args.group_size, threads=args.threads,
                          revision=args.revision, tokenizer=args.tokenizer, resume=args.resume,
                          ensemble=tuple(args.ensemble),
                          rows_per_part=args.rows_per_part, chunk_rows=args.chunk_rows, normalize=args.normalize,
                          reranker_options={k: True for k, on in (("compile_model", args.compile),
                                                                  ("exact_head", args.exact_head)) if on} or None)
    resume_hint = (f"finished parts are kept in {args.output}: rerun the same command with --resume to finish "
                   "the job")
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args.ray:
            from .ray_job import DEFAULT_ACTOR_RESTARTS, run_ray_job

            restarts = DEFAULT_ACTOR_RESTARTS if args.actor_restarts is None else args.actor_restarts
            summary = run_ray_job(args.model, args.input, args.output, address=args.ray_address,
                                  actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                                  cpus_per_actor=args.cpus_per_actor, max_restarts=restarts,
                                  progress=not args.no_progress, **engine_options)
        else:
            from .batch import run_job

            summary = run_job(args.model, args.input, args.output, progress=not args.no_progress, **engine_options)
    except InstructRecError as exc:
        # Typed, expected failures (schema, output folder, model, disk full): the message says the fix.
        log.error("%s", exc)
        return EXIT_INPUT
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:  # ray.init installs a SIGTERM handler that exits with 15
            raise
        log.error("rerank: stopped by SIGTERM; %s", resume_hint)
        return EXIT_TERMINATED
    except Terminated:
        log.error("rerank: stopped by SIGTERM; %s", resume_hint)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        log.error("rerank: interrupted; %s", resume_hint)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    from .batch import format_summary

    print(format_summary(summary))
    return 0
