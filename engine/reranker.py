"""Reranker: score candidate titles by log P(title | instruction) with a T5 checkpoint.

The orchestration layer of the engine: requests are validated, their titles tokenized as
training targets are written, their instructions rendered (engine/formatting.py) and grouped
into tournaments where they list more candidates than a group holds (engine/tournament.py);
units of work then go to the device loop (engine/runner.py) and come back as scores to rank.
Loading lives in engine/loading.py (from_pretrained / from_model), the model behind the
`Backend` protocol in engine/backend.py (torch) and engine/onnx_backend.py (onnxruntime).

Work done per instruction (per tournament group): one encoder pass and one cross-attention K/V
computation per decoder layer, shared by all its candidates; the candidates are packed into
decoder rows (see model.py / packing.py); the LM head and log-softmax-gather run in token chunks
through `instructrec.kernels.lm_head_log_softmax_gather`, so [tokens x vocab] never exists.

Ensembles: a Reranker may hold several models that share one tokenizer (seeds of one recipe,
`Reranker.from_pretrained([path_a, path_b])`). Each unit is then scored by every model, each
model's scores are normalized under the score form with its own title priors, standardised within
the list (a request, or one tournament group: engine/fusion.py's `standardised`) and summed with
equal weights; "+priors:V" fuses the sum. Standardising first gives each model one vote whatever
the spread of its log-likelihoods. The work grows with the models (the stats count every model's
passes); the instruction is rendered and tokenized once.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .backend import Backend
from .errors import BudgetExceededError, InputError
from .formatting import MAX_CHARS_PER_TOKEN, lists_candidates, max_source_chars, render, sanitize_text
from .fusion import fuse_priors, standardised
from .loading import Loaded, load_from_model, load_pretrained
from .packing import Unit
from .runner import DEFAULT_READ_WINDOW, DEFAULT_ROW_TOKENS, DeviceRunner
from .sources import ModelSource
from .tournament import Tournament, check_tournament_options
from .types import EngineStats, RankedResult, Request, ScoreForm, parse_score_form

__all__ = ["Reranker"]

log = logging.getLogger(__name__)

_ERRORS = ("raise", "return")
# Titles per unit when their priors are scored (normalize="calibrated"): one empty encoding,
# candidates packed into rows like any request's.
_PRIOR_UNIT_TITLES = 256
# Title priors an engine keeps (least recently used go first). A Flan-T5 token id is 8 bytes in the
# key, so an entry of a 12-token title costs about 250 bytes with the dict's own: a million, about
# 250 MB, holds a large catalogue's titles, and a nightly job over a larger one scores a few twice.
DEFAULT_TITLE_PRIOR_CACHE = 1_000_000
# Longest candidate title, in target tokens (closing </s> included). Decoder memory grows with the
# square of a row's length (a 10,000-character title took 1.8 GiB), so a longer title is an
# over_budget error of its request instead of a risk to the whole job. Real catalogues sit far
# below: with the Flan-T5 tokenizer the 17,332 titles of the Video Games 2018 meta have a median of
# 12 tokens, 99.9% within 75 and a longest of 181 (3 over 128); the 2,553 titles of the 2023
# sample (24 categories) reach 103. 256 keeps every real title with room to spare.
DEFAULT_MAX_TARGET_TOKENS = 256


def _instruction_text(request: Request, titles: Sequence[str] | None, tokenizer: Any,
                      max_source_tokens: int) -> tuple[str, list[int] | None]:
    """The one place a request (and, for listed-candidate instructions, the titles of the group
    being scored) becomes instruction text, with its token ids when a tokenizer is given:
    engine/formatting.py's render (raises UnknownTemplateError / BudgetExceededError / InputError)."""
    return render(
        instruction=request.instruction, history=request.history, preference=request.preference,
        intention=request.intention, intention_kind=request.intention_kind, context=request.context,
        template=request.template, candidates=None if titles is None else list(titles),
        tokenizer=tokenizer, max_source_tokens=max_source_tokens)


def _lists_candidates(request: Request) -> bool:
    return lists_candidates(
        instruction=request.instruction, history=request.history, preference=request.preference,
        intention=request.intention, intention_kind=request.intention_kind, context=request.context,
        template=request.template)


@dataclass
class _Prepared:
    index: int
    request: Request
    ids: list[str]
    titles: list[str]
    targets: list[np.ndarray]
    lists: bool
    priors: np.ndarray | None = None  # [candidates] float64: the request's candidate_priors, if any


class Reranker:
    """Scores and ranks candidate titles under instructions with a T5 / Flan-T5 model."""

    def __init__(self, backend: Backend, tokenizer: Any, *, device: str | torch.device | None = None,
                 source: ModelSource | None = None, max_source_tokens: int = 512,
                 max_target_tokens: int = DEFAULT_MAX_TARGET_TOKENS,
                 batch_tokens: int | None = None, group_size: int = 10, advance: int = 1,
                 seed: int = 0, row_tokens: int = DEFAULT_ROW_TOKENS,
                 read_window: int = DEFAULT_READ_WINDOW, chunk_tokens: int | None = None,
                 compile_model: bool = False, exact_head: bool = False,
                 title_prior_cache: int = DEFAULT_TITLE_PRIOR_CACHE, ensemble: Sequence[Backend] = (),
                 ensemble_sources: Sequence[ModelSource | None] | None = None):
        """`backend`: anything that answers engine/backend.py's Backend protocol (the torch model
        of `from_pretrained` / `from_model`, or an OnnxBackend). Most callers use the class
        methods, which also resolve the model source and load the tokenizer.
        chunk_tokens: LM-head rows per matmul chunk (None: the kernels' measured default for
        the backend's device, instructrec.kernels.default_chunk_tokens). batch_tokens: token slots
        per batch (None: engine/runner.py's default_batch_tokens for the device). exact_head: fp32
        LM-head logits with bf16 weights on CPU (torch backend; see TorchBackend.head for its cost).
        title_prior_cache: title priors kept for normalize="calibrated" (least recently used go
        first; the titles of one call are always kept until it returns). ensemble: the backends of
        further models scored with `tokenizer` beside `backend` (see the module docstring), on the
        same device; ensemble_sources: what each was loaded from (for `sources`)."""
        check_tournament_options(group_size, advance)
        for name, value in (("max_source_tokens", max_source_tokens), ("max_target_tokens", max_target_tokens),
                            ("batch_tokens", 1 if batch_tokens is None else batch_tokens),
                            ("row_tokens", row_tokens), ("read_window", read_window),
                            ("chunk_tokens", 1 if chunk_tokens is None else chunk_tokens),
                            ("title_prior_cache", title_prior_cache)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(name, f"must be a positive int, got {value!r}")
        if device is not None and torch.device(device) != backend.device:
            raise InputError("device", f"{device!r} given for a backend on {backend.device}",
                             "leave device out, or load the model on that device")
        if not isinstance(compile_model, bool):
            raise InputError("compile_model", f"must be True or False, got {compile_model!r}")
        backends = (backend, *ensemble)
        ensemble_sources = [None] * len(ensemble) if ensemble_sources is None else list(ensemble_sources)
        if len(ensemble_sources) != len(ensemble):
            raise InputError("ensemble_sources", f"{len(ensemble_sources)} sources for {len(ensemble)} ensemble "
                             "backends", "give one source per backend, or none")
        for n, other in enumerate(ensemble, start=1):
            if other.device != backend.device:
                raise InputError(f"ensemble[{n - 1}]", f"a backend on {other.device} beside one on {backend.device}",
                                 "load every model of an ensemble on one device")
            if (other.cfg.eos_token_id, other.cfg.pad_token_id) != (backend.cfg.eos_token_id, backend.cfg.pad_token_id):
                raise InputError(f"ensemble[{n - 1}]", "its </s> and padding ids differ from the first model's",
                                 "ensemble models that share one tokenizer")
        if compile_model:
            for b in backends:
                compile_backend = getattr(b, "compile", None)  # the torch backend's torch.compile
                if compile_backend is None:
                    raise InputError("compile_model", "only the torch backend can be compiled",
                                     "drop compile_model, or load the checkpoint with backend='torch'")
            for b in backends:
                b.compile()
        self.backend = backend
        self.source = source  # what the model was loaded from (None for from_model): its identity() for manifests
        self.backends = backends  # the ensemble's models in scoring order; (backend,) for one model
        self.sources = (source, *ensemble_sources)
        self.tokenizer = tokenizer
        # Every text the engine tokenizes is counted against its own budgets first, so transformers'
        # "Token indices sequence length is longer than the specified maximum" warning (about the
        # tokenizer's model_max_length) would only be noise: verbose=False silences it, per call.
        self._tokenize = functools.partial(tokenizer, verbose=False)
        self.device = backend.device
        self.dtype = backend.dtype
        self.max_source_tokens = max_source_tokens
        self.max_target_tokens = max_target_tokens
        self.group_size, self.advance, self.seed = group_size, advance, seed
        self._runners = [DeviceRunner(b, batch_tokens=batch_tokens, row_tokens=row_tokens, read_window=read_window,
                                      chunk_tokens=chunk_tokens, exact_head=exact_head) for b in backends]
        self._runner = self._runners[0]
        self.stats = EngineStats()
        self.timings = {"tokenize_s": 0.0, "model_s": 0.0}
        # normalize="calibrated": log P(title | "") per title, keyed by its target ids, scored once
        # per engine while it stays among the `title_prior_cache` most recently used (a nightly
        # job's catalogue titles repeat across requests). An ensemble's further models keep theirs
        # under the same keys in plain dicts; this one's order decides what goes.
        self.title_prior_cache = title_prior_cache
        self._title_priors: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._ensemble_title_priors: list[dict[bytes, float]] = [{} for _ in ensemble]
        cfg = backend.cfg
        # Targets that carry no title text: </s>, padding and the bare word-start piece "▁" (a
        # zero-width or control-character title tokenizes to just ["▁", "</s>"]).
        blank = {cfg.eos_token_id, cfg.pad_token_id}
        word_start = tokenizer.convert_tokens_to_ids("▁")
        if isinstance(word_start, int) and word_start != tokenizer.unk_token_id:
            blank.add(word_start)
        self._blank_ids = np.array(sorted(blank), dtype=np.int64)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | ModelSource, backend: str = "auto", device: str = "cpu",
                        dtype: str = "auto", *, revision: str | None = None, tokenizer: Any = None,
                        **options: Any) -> "Reranker":
        """Load a model: a `save_pretrained` folder (sharded safetensors and pytorch_model.bin
        included), a Hugging Face Hub id (`google/flan-t5-base`, optionally at `revision`; through
        the Hugging Face cache), an `instructrec export` folder, `random:<shape>` (random weights,
        for speed and memory work only; needs `tokenizer=`), or a ModelSource from
        `instructrec.engine.sources.resolve_model`. It is kept as `reranker.source`. A list of
        them loads an ensemble (module docstring): every model with these arguments, one tokenizer
        vocabulary among them (InputError otherwise), kept as `reranker.sources`.

        backend: "auto" (torch for a checkpoint or random model, onnx for an export folder),
        "torch" or "onnx". dtype: "auto" (engine/capabilities.py: bf16 on CUDA and on CPUs where
        it is native and measured faster, else fp32; an export's own dtype for onnx), "float32"
        or "bfloat16". tokenizer: a folder or Hub id (or a loaded tokenizer) to use instead of the
        model folder's. options: max_source_tokens, batch_tokens, group_size, advance, seed,
        row_tokens, read_window, chunk_tokens, compile_model (torch only: torch.compile the
        encoder and decoder; see TorchBackend.compile), exact_head (torch only: fp32 LM-head
        logits with bf16 weights on CPU); onnx only: threads (onnxruntime intra-op threads),
        verify_checksums (default True: sha256 of every graph before loading), allow_cpu_nodes
        (CUDA: load even if onnxruntime would run graph nodes on the CPU; default False raises
        DevicePlacementError listing them)."""
        if isinstance(model, (list, tuple)):
            return cls._from_ensemble(model, backend, device, dtype, revision, tokenizer, options)
        loaded = load_pretrained(model, backend, device, dtype, revision=revision, tokenizer=tokenizer,
                                 options=options)
        return cls._from_loaded(loaded)

    @classmethod
    def _from_ensemble(cls, models: Sequence[Any], backend: str, device: str, dtype: str, revision: str | None,
                       tokenizer: Any, options: dict[str, Any]) -> "Reranker":
        if not models:
            raise InputError("model", "an empty list of models", "give one model, or a list of several")
        if revision is not None and len(models) > 1:
            raise InputError("revision", f"one revision given for {len(models)} models",
                             "pin each Hub model with instructrec.engine.sources.resolve_model(id, revision=...)")
        loaded = [load_pretrained(m, backend, device, dtype, revision=revision, tokenizer=tokenizer, options=options)
                  for m in models]
        first = loaded[0]
        vocabulary = first.tokenizer.get_vocab()
        for n, other in enumerate(loaded[1:], start=1):
            if other.tokenizer.get_vocab() != vocabulary:
                raise InputError(f"model[{n}]", f"{_describe(other.source, models[n])} tokenizes with another "
                                 f"vocabulary than {_describe(first.source, models[0])}",
                                 "ensemble models trained with one tokenizer (and one --compact-vocab catalogue)")
        return cls(first.backend, first.tokenizer, source=first.source, ensemble=[x.backend for x in loaded[1:]],
                   ensemble_sources=[x.source for x in loaded[1:]], **first.options)

    @classmethod
    def from_model(cls, hf_model: Any, tokenizer: Any, backend: str = "torch", device: str = "cpu",
                   dtype: str = "auto", **options: Any) -> "Reranker":
        """From an in-memory transformers T5ForConditionalGeneration. Its weights are copied, so
        later training steps do not change this reranker: build a new one to validate new weights."""
        return cls._from_loaded(load_from_model(hf_model, tokenizer, backend, device, dtype, options))

    @classmethod
    def _from_loaded(cls, loaded: Loaded) -> "Reranker":
        return cls(loaded.backend, loaded.tokenizer, source=loaded.source, **loaded.options)

    # The device loop's budgets (engine/runner.py), fixed at construction.
    batch_tokens = property(lambda self: self._runner.batch_tokens)
    row_tokens = property(lambda self: self._runner.row_tokens)
    read_window = property(lambda self: self._runner.read_window)
    chunk_tokens = property(lambda self: self._runner.chunk_tokens)

    def reset_stats(self) -> None:
        self.stats = EngineStats()
        self.timings = {"tokenize_s": 0.0, "model_s": 0.0}

    def clear_title_priors(self) -> None:
        """Forget the cached title priors of normalize="calibrated". A prior is a float sum whose
        last bits depend on the batch it was scored in, hence on which titles were missing at the
        time; the batch job clears them at each part so that a part's scores depend on that part
        alone (bit-identical on --resume and on any Ray actor)."""
        for priors in (self._title_priors, *self._ensemble_title_priors):
            priors.clear()

    # ---------------------------------------------------------------------------------- public
    def score(self, instruction: str, candidates: Sequence[str], normalize: str = "sum",
              candidate_priors: Sequence[float] | None = None) -> np.ndarray:
        """log P(title | instruction) of every candidate, teacher-forced, all under one encoding
        (no tournament; `{candidates}` in the instruction lists all of them). [K] float64.
        normalize: "sum", "mean" (per title token), "calibrated" (minus the title's log-likelihood
        under an empty instruction) or "calibrated:W" (minus W times it); any of them followed by
        "+priors:V" fuses `candidate_priors` (one number per candidate) into the scores
        (engine/fusion.py)."""
        form = parse_score_form(normalize)
        request = Request(instruction=instruction, candidates=candidates, candidate_priors=candidate_priors)
        prepared = self._prepare([request], errors="raise")[0]
        assert isinstance(prepared, _Prepared)
        self._check_priors(prepared, {normalize: form})
        unit = self._unit(prepared, np.arange(len(prepared.titles)))
        self.stats.requests += 1
        if form.kind == "calibrated":
            self._score_title_priors(prepared.targets)
        self._run_units([unit])
        return self._normalized(prepared, unit, form)

    def rank(self, requests: Sequence[Request], errors: str = "raise",
             normalize: str = "sum") -> list[RankedResult]:
        """Rank the candidates of every request, batched together; results in input order.
        errors="return": a bad request gets a result with `error`/`error_kind` set and empty
        lists, and never disturbs the others; errors="raise": the first InputError is raised."""
        _check_choice("errors", errors, _ERRORS)
        form = parse_score_form(normalize)
        self.stats.requests += len(requests)
        return self._rank(requests, errors, {normalize: form})[normalize]

    def rank_forms(self, requests: Sequence[Request], forms: Sequence[str],
                   errors: str = "raise") -> dict[str, list[RankedResult]]:
        """rank() under several score forms at once: {form: results in input order}, each the
        results of rank(requests, errors, normalize=form). The forms differ only in how a
        candidate's summed log-likelihood is normalized, so a request scored directly is
        encoded and decoded once for all of them (a model evaluation choosing its form on
        validation saves a pass per extra form); a tournament runs once per form, as its later
        rounds depend on the scores, but a group that several forms' tournaments hold in the
        same round (all of round 1, a later one where the forms advanced the same titles) is
        scored once."""
        _check_choice("errors", errors, _ERRORS)
        if isinstance(forms, str) or not forms or len(set(forms)) != len(forms):
            raise InputError("forms", f"expected distinct score forms, got {forms!r}",
                             "pass a list such as ['sum', 'calibrated:0.5']")
        parsed = {f: parse_score_form(f, field="forms") for f in forms}
        self.stats.requests += len(requests)
        return self._rank(requests, errors, parsed)

    def _rank(self, requests: Sequence[Request], errors: str,
              forms: dict[str, ScoreForm]) -> dict[str, list[RankedResult]]:
        """{form name: results in input order}. Each round runs the next step of every live
        request in one batch: a request scored directly (once, read by every form) or the next
        round of each form's tournament."""
        out: dict[str, list[RankedResult | None]] = {f: [None] * len(requests) for f in forms}
        failed: set[int] = set()

        def fail(i: int, e: InputError) -> None:
            if errors == "raise":
                raise e
            failed.add(i)
            for results in out.values():
                results[i] = _failure(requests[i], e)

        prepared = self._prepare(requests, errors)
        for i, p in enumerate(prepared):
            if isinstance(p, _Prepared):
                try:
                    self._check_priors(p, forms)
                except InputError as e:
                    prepared[i] = e
            if isinstance(prepared[i], InputError):
                fail(i, prepared[i])
        live = [p for p in prepared if isinstance(p, _Prepared)]
        if any(form.kind == "calibrated" for form in forms.values()):
            self._score_title_priors([t for p in live for t in p.targets])

        # A step: (request, form, tournament), or (request, None, None) for a request scored directly.
        steps: list[tuple[_Prepared, str | None, Tournament | None]] = []
        for p in live:
            if p.lists and len(p.titles) > self.group_size:
                steps += [(p, f, Tournament(len(p.titles), self.group_size, self.advance, self.seed))
                          for f in forms]
            else:
                steps.append((p, None, None))
        while steps:
            running: list[tuple[_Prepared, str | None, Tournament | None, list[Unit]]] = []
            for (p, f, t), new in zip(steps, self._units_for([(p, t) for p, _, t in steps])):
                if p.index in failed:
                    continue
                if isinstance(new, InputError):
                    fail(p.index, new)
                else:
                    running.append((p, f, t, new))
            running = [r for r in running if r[0].index not in failed]
            self._run_units(list({id(u): u for *_, units in running for u in units}.values()))
            steps = []
            for p, f, t, units in running:
                if t is None:  # scored directly: rank by score under every form
                    for name, form in forms.items():
                        s = self._normalized(p, units[0], form)
                        order = np.argsort(-s, kind="stable")
                        out[name][p.index] = _result(p, order, s[order])
                    continue
                assert f is not None
                t.record([self._normalized(p, u, forms[f]) for u in units])
                if t.done:
                    order, s = t.result()
                    out[f][p.index] = _result(p, order, s)
                else:
                    steps.append((p, f, t))
        return out  # type: ignore[return-value]

    # --------------------------------------------------------------------------- preparation
    def _prepare(self, requests: Sequence[Request], errors: str) -> list["_Prepared | InputError"]:
        """Validate every request and tokenize all titles in one tokenizer call."""
        out: list[_Prepared | InputError] = []
        for i, r in enumerate(requests):
            try:
                out.append(self._validate(i, r))
            except InputError as e:
                if errors == "raise":
                    raise
                out.append(e)
        live = [p for p in out if isinstance(p, _Prepared)]
        titles = [t for p in live for t in p.titles]
        t0 = time.perf_counter()
        ids = self._tokenize(text_target=titles, add_special_tokens=True)["input_ids"] if titles else []
        self.timings["tokenize_s"] += time.perf_counter() - t0
        k = 0
        position = {id(p): n for n, p in enumerate(out)}
        blank = self._blank_titles(ids)
        for p in live:
            n = len(p.titles)
            p.targets = [np.asarray(x, dtype=np.int64) for x in ids[k:k + n]]
            long = np.fromiter((len(y) > self.max_target_tokens for y in p.targets), dtype=bool, count=n)
            bad = np.flatnonzero(blank[k:k + n] | long)
            k += n
            if len(bad):
                c = int(bad[0])
                if long[c]:
                    e = self._title_over_budget(c, f"{len(p.targets[c])} tokens")
                else:
                    e = InputError(f"candidates[{c}]", f"title {list(p.request.candidates)[c]!r} tokenizes to "
                                   "nothing: no token besides the closing </s>", "drop or fix this candidate")
                if errors == "raise":
                    raise e
                out[position[id(p)]] = e
        return out

    def _blank_titles(self, ids: list[list[int]]) -> np.ndarray:
        """[titles] bool: the title has no token besides </s>, padding or a bare word start.
        One vectorised pass over all titles (a per-title np.isin cost ~40 us each)."""
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
        text_so_far = np.concatenate([[0], np.cumsum(~np.isin(flat, self._blank_ids))])
        ends = np.cumsum(lengths)
        return text_so_far[ends] - text_so_far[ends - lengths] == 0

    def _title_over_budget(self, c: int, size: str) -> BudgetExceededError:
        return BudgetExceededError(f"candidates[{c}]", f"title is {size}, over max_target_tokens="
                                   f"{self.max_target_tokens}", "shorten this title, or raise max_target_tokens")

    def _validate(self, i: int, r: Request) -> _Prepared:
        if not isinstance(r, Request):
            raise InputError("request", f"expected instructrec.engine.Request, got {type(r).__name__}",
                             "build each item as Request(instruction=..., candidates=[...])")
        cands = r.candidates
        if cands is None or isinstance(cands, (str, bytes)):
            raise InputError("candidates", "must be a list of titles", "pass e.g. ['Title A', 'Title B']")
        titles = list(cands)
        if not titles:
            raise InputError("candidates", "empty candidate list", "give at least one candidate title")
        for c, t in enumerate(titles):
            if t is not None and not isinstance(t, str):
                raise InputError(f"candidates[{c}]", f"title must be text, got {type(t).__name__} {t!r}",
                                 "every candidate title is a string")
            if t is None or not t.strip():
                raise InputError(f"candidates[{c}]", f"null or empty title ({t!r})",
                                 "every candidate needs a non-empty title")
        # Titles are scored as training targets were written and as listed candidates are
        # (engine/formatting.py): "Game {Deluxe} Edition" is scored as "Game (Deluxe) Edition",
        # never with the <unk> tokens the model never saw in a target.
        titles = [sanitize_text(t) for t in titles]
        for c, t in enumerate(titles):  # refused before tokenizing: no title length costs more than this
            if len(t) > self.max_target_tokens * MAX_CHARS_PER_TOKEN:
                raise self._title_over_budget(c, f"{len(t):,} characters")
        if r.candidate_ids is None:
            ids = [str(c) for c in range(len(titles))]
        else:
            ids = list(r.candidate_ids)
            if len(ids) != len(titles):
                raise InputError("candidate_ids", f"{len(ids)} ids for {len(titles)} candidates",
                                 "give one id per candidate, or none")
            for c, x in enumerate(ids):
                if x is None:
                    raise InputError(f"candidate_ids[{c}]", "null id", "give every candidate an id")
            ids = [str(x) for x in ids]
            seen: set[str] = set()
            for x in ids:
                if x in seen:
                    raise InputError("candidate_ids", f"duplicate id {x!r}", "ids must be unique per request")
                seen.add(x)
        priors = None if r.candidate_priors is None else _valid_priors(r.candidate_priors, len(titles))
        return _Prepared(i, r, ids, titles, [], _lists_candidates(r), priors)

    @staticmethod
    def _check_priors(p: _Prepared, forms: dict[str, ScoreForm]) -> None:
        """A form that fuses candidate priors needs them: InputError where the request has none."""
        fusing = [name for name, form in forms.items() if form.candidate_prior_weight > 0]
        if fusing and p.priors is None:
            raise InputError("candidate_priors", f"the score form {fusing[0]!r} fuses candidate priors, but "
                             "this request has none", "give one number per candidate (e.g. log(1 + the item's "
                             "interactions)), or rank with a form without +priors:V")

    def _unit(self, p: _Prepared, members: np.ndarray) -> Unit:
        """One encoding: the instruction (listing `members` if it lists candidates) tokenized and
        checked against the source budget. Raises InputError."""
        unit = self._make_units([(p, members)])[0]
        if isinstance(unit, InputError):
            raise unit
        return unit

    def _make_units(self, work: list[tuple[_Prepared, np.ndarray]]) -> "list[Unit | InputError]":
        """Units for many (request, members) at once, with one tokenizer call for all of them.

        Texts are rendered without the tokenizer first (no budget check, all of the history), then
        tokenized together. A text within max_source_tokens is exactly what budget-aware rendering
        gives (it only ever drops history when the whole text is over budget). Only the rare text
        over budget (or over the character cap, which is not tokenized here at all) is rendered
        again with the tokenizer, which drops the oldest history items to fit, returning the ids
        it counted, or raises BudgetExceededError. Per request this saves two tokenizer calls (the
        budget count and the encoding) and their Python overhead: ~0.2 ms, the engine's largest
        host cost on small requests."""
        t0 = time.perf_counter()
        out: list[Unit | InputError | None] = [None] * len(work)
        texts: list[str] = []
        rendered: list[int] = []
        refit: list[int] = []
        for n, (p, members) in enumerate(work):
            titles = [p.titles[c] for c in members] if p.lists else None
            try:
                text, _ = _instruction_text(p.request, titles, None, self.max_source_tokens)
            except InputError as e:
                out[n] = e
                continue
            if len(text) > max_source_chars(self.max_source_tokens):
                refit.append(n)
            else:
                texts.append(text)
                rendered.append(n)
        ids = self._tokenize(texts, add_special_tokens=True)["input_ids"] if texts else []
        sources: dict[int, list[int]] = {}
        for n, src_ids in zip(rendered, ids):
            if len(src_ids) > self.max_source_tokens:
                refit.append(n)
            else:
                sources[n] = src_ids
        for n in refit:
            p, members = work[n]
            titles = [p.titles[c] for c in members] if p.lists else None
            try:
                sources[n] = _instruction_text(p.request, titles, self._tokenize, self.max_source_tokens)[1]
            except InputError as e:
                out[n] = e
        for n, src_ids in sources.items():
            p, members = work[n]
            out[n] = Unit(source=np.asarray(src_ids, dtype=np.int64), owner=p.index, tag=members,
                          targets=[p.targets[c] for c in members])
        self.timings["tokenize_s"] += time.perf_counter() - t0
        return out  # type: ignore[return-value]

    def _units_for(self, work: list[tuple[_Prepared, Tournament | None]]) -> "list[list[Unit] | InputError]":
        """The units of each request's next step (the whole request, or the groups of its
        tournament's next round), or the first InputError among them. A group that several work
        items hold (the same round of one request's tournaments under different score forms)
        gets one unit, shared."""
        flat: list[tuple[_Prepared, np.ndarray]] = []
        where: dict[tuple[int, bytes], int] = {}
        refs: list[list[int]] = []
        for p, t in work:
            groups = [np.arange(len(p.titles))] if t is None else t.groups()
            mine = []
            for g in groups:
                key = (p.index, np.asarray(g, dtype=np.int64).tobytes())
                if key not in where:
                    where[key] = len(flat)
                    flat.append((p, g))
                mine.append(where[key])
            refs.append(mine)
        units = self._make_units(flat)
        out: list[list[Unit] | InputError] = []
        for mine in refs:
            made = [units[n] for n in mine]
            error = next((u for u in made if isinstance(u, InputError)), None)
            out.append(error if error is not None else made)  # type: ignore[arg-type]
        return out

    def _normalized(self, p: _Prepared, u: Unit, form: ScoreForm) -> np.ndarray:
        """The scores of unit `u` (candidates u.tag of request `p`) under `form`; an ensemble's are
        each model's, standardised within the unit and summed; a "+priors:V" form fuses them with
        those candidates' priors, within this unit (a request, or one tournament group: its winners
        are the best of the fused group)."""
        per_model = [u.scores] if u.model_scores is None else u.model_scores
        if form.kind == "mean":
            lengths = np.array([len(y) for y in u.targets], dtype=np.float64)
            normalized = [raw / lengths for raw in per_model]
        elif form.kind == "calibrated":
            keys = [y.tobytes() for y in u.targets]
            normalized = [raw - form.prior_weight * np.array([priors[k] for k in keys], dtype=np.float64)
                          for raw, priors in zip(per_model, (self._title_priors, *self._ensemble_title_priors))]
        else:
            normalized = per_model
        scores = normalized[0] if len(normalized) == 1 else np.sum([standardised(s) for s in normalized], axis=0)
        if form.candidate_prior_weight > 0:
            assert p.priors is not None  # _check_priors refused the request otherwise
            return fuse_priors(scores, p.priors[u.tag], form.candidate_prior_weight)
        return scores

    def _score_title_priors(self, targets: Sequence[np.ndarray]) -> None:
        """log P(title | empty instruction) of every target not scored yet. A title the model
        generates whatever it is asked (a frequent training target) has a high prior; subtracting
        it leaves what the instruction adds (a pointwise mutual information), which lets titles
        the model never generated in training compete (product search on unseen items)."""
        by_key = {t.tobytes(): t for t in targets}
        priors = self._title_priors
        missing = []
        for key, t in by_key.items():
            if key in priors:
                priors.move_to_end(key)  # used by this call: the last to go
            else:
                missing.append(t)
        if missing:
            empty = np.asarray(self._tokenize("", add_special_tokens=True)["input_ids"], dtype=np.int64)
            units = [Unit(source=empty, targets=missing[a:a + _PRIOR_UNIT_TITLES])
                     for a in range(0, len(missing), _PRIOR_UNIT_TITLES)]
            self._run_units(units)
            for unit in units:
                keys = [t.tobytes() for t in unit.targets]
                per_model = [unit.scores] if unit.model_scores is None else unit.model_scores
                for cache, scores in zip((priors, *self._ensemble_title_priors), per_model):
                    cache.update(zip(keys, map(float, scores)))
            self.stats.title_priors += len(missing)
        # This call's titles sit at the end; only older ones go, so its scores can still be read.
        for _ in range(len(priors) - max(self.title_prior_cache, len(by_key))):
            key, _ = priors.popitem(last=False)
            for other in self._ensemble_title_priors:
                del other[key]

    def _run_units(self, units: list[Unit]) -> None:
        """Fill unit.scores (sum of token log-probs per candidate) for every unit, on the device;
        with an ensemble, every model's in unit.model_scores (unit.scores the first model's)."""
        t0 = time.perf_counter()
        per_model = []
        for runner in self._runners:
            runner.run(units, self.stats)
            per_model.append([u.scores for u in units])
        if len(per_model) > 1:
            for n, u in enumerate(units):
                u.model_scores = [scores[n] for scores in per_model]
                u.scores = u.model_scores[0]
        self.timings["model_s"] += time.perf_counter() - t0


def _describe(source: ModelSource | None, given: Any) -> str:
    return source.describe() if source is not None else repr(given)


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(field, f"{value!r} is not one of {allowed}", f"use one of {allowed}")


def _n(r: Any) -> int:
    """The candidate count an error result reports (0 where the request has no countable list)."""
    if not isinstance(r, Request):
        return 0
    try:
        return 0 if r.candidates is None or isinstance(r.candidates, str) else len(r.candidates)
    except TypeError:
        return 0


def _valid_priors(values: Any, n: int) -> np.ndarray:
    """A request's candidate_priors as [n] float64, or InputError naming the offending entry."""
    fix = "give one finite number per candidate, in candidate order (or no candidate_priors)"
    if isinstance(values, (str, bytes)):
        raise InputError("candidate_priors", "must be a list of numbers", fix)
    try:
        values = list(values)
    except TypeError:
        raise InputError("candidate_priors", f"must be a list of numbers, got {type(values).__name__} "
                         f"{values!r}", fix) from None
    if len(values) != n:
        raise InputError("candidate_priors", f"{len(values)} priors for {n} candidates", fix)
    for c, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise InputError(f"candidate_priors[{c}]", f"must be a number, got {type(v).__name__} {v!r}", fix)
        if not np.isfinite(v):
            raise InputError(f"candidate_priors[{c}]", f"must be finite, got {v!r}", fix)
    return np.asarray(values, dtype=np.float64)


def _failure(r: Any, e: InputError) -> RankedResult:
    """The result of a request the engine refused (errors="return")."""
    return RankedResult(request_id=r.request_id if isinstance(r, Request) else None,
                        n_candidates=_n(r), error=str(e), error_kind=e.kind)


def _result(p: _Prepared, order: np.ndarray, scores: np.ndarray) -> RankedResult:
    return RankedResult(request_id=p.request.request_id, ranked_ids=[p.ids[c] for c in order],
                        scores=[float(s) for s in scores], n_candidates=len(p.titles))
