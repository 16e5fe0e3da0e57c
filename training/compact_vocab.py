"""A compact vocabulary for a model trained from random weights (`instructrec train --compact-vocab`).

A random T5 shape carries Flan-T5's 32,128-row embedding and LM head, yet a catalogue's text uses a
few thousand of those pieces (the Video Games titles and instructions: 5,651). For a small shape the
vocabulary is most of the model (t5-micro: 8.2M of its 10.0M parameters) and of each step: the head
and its softmax run over every row for each target token, and the optimiser walks every row. With
`--compact-vocab` the trainer keeps only the pieces the model can meet and gives the model a
vocabulary of that size; the model's folder then holds the compact tokenizer beside the weights,
so the engine, the export and the job score with it as with any checkpoint. The model's softmax is
over its own vocabulary, in training and in scoring alike: the objective the engine reads is the one
the model was trained on.

What is kept, in the source tokenizer's order (ids stay ascending, so <pad> 0, </s> 1, <unk> 2):
- the special tokens and the sentinels <extra_id_N> (catalogue pretraining's span corruption);
- every single-character piece (with or without the word-start marker), so that any text the source
  tokenizer could spell is still spelt, in smaller pieces where a word's own piece was dropped;
- every piece of the given texts' tokenizations: the training and validation instructions, their
  targets and candidates, every registered template's wording, and optionally a catalogue's titles.

Why the given texts tokenize exactly as before: a SentencePiece unigram tokenizer picks the
segmentation of highest total piece score (Viterbi). Dropping pieces only removes segmentations;
the best one of a kept text used kept pieces only, so it is still there and still the best. Texts
with dropped pieces (a new item's title) fall back to kept ones, never to <unk> unless the source
tokenizer would also have.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from pathlib import Path
from typing import Iterable

from instructrec.engine.errors import InputError

from .embedding_init import WORD_START

log = logging.getLogger(__name__)

# The model's vocabulary is the tokenizer's length rounded up to this (T5 itself holds 32,100 tokens
# in 32,128 rows): matmul-friendly head shapes. The rows past the tokenizer are never a target.
VOCAB_ROWS_MULTIPLE = 64
# Texts tokenized per call while collecting pieces.
_CHUNK = 4096


def template_wording() -> list[str]:
    """The fixed text of every registered template (sources and target patterns with their
    `{slot}` placeholders cut out): words the engine writes into instructions whatever the data."""
    from instructrec.engine.templates import PLACEHOLDER, REGISTRY

    texts = []
    for template in REGISTRY.values():
        for pattern in (template.source, template.target_pattern):
            if pattern:
                texts.extend(part for part in PLACEHOLDER.split(pattern)[::2] if part.strip())
    return texts


def used_piece_ids(tokenizer, texts: Iterable[str]) -> set[int]:
    """The ids of every piece in the tokenizations of `texts` (special tokens not added). Each
    distinct text is tokenized once: titles recur in thousands of histories and candidate lists."""
    used: set[int] = set()
    chunk: list[str] = []
    texts = dict.fromkeys(texts)

    def flush():
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            used.update(ids)
        chunk.clear()

    for text in texts:
        if text:
            chunk.append(text)
        if len(chunk) >= _CHUNK:
            flush()
    if chunk:
        flush()
    return used


def compact_tokenizer(tokenizer, texts: Iterable[str]):
    """A tokenizer holding only what `texts` (and the engine's templates) need, as the module
    docstring says; a fast T5 tokenizer of the same normaliser, pre-tokeniser and special tokens.
    Raises InputError("tokenizer") for a tokenizer that is not a SentencePiece unigram one."""
    from transformers import AutoTokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else None
    if spec is None or spec.get("model", {}).get("type") != "Unigram":
        raise InputError("tokenizer", f"{type(tokenizer).__name__} is not a SentencePiece unigram tokenizer "
                         "(tokenizer.json with a Unigram model)",
                         "use a T5 / Flan-T5 tokenizer, or drop --compact-vocab")
    pieces = spec["model"]["vocab"]  # [piece, score], index = id
    added = {int(token["id"]) for token in spec["added_tokens"]}
    keep = used_piece_ids(tokenizer, itertools.chain(texts, template_wording()))
    keep.update(i for i, (piece, _) in enumerate(pieces) if len(piece.replace(WORD_START, "")) <= 1)
    keep.update(tokenizer.all_special_ids)
    keep.add(int(spec["model"]["unk_id"]))
    # Every added token is kept (specials and sentinels). Those inside the piece table (T5: <pad>
    # </s> <unk> at 0-2) keep their place among the pieces; the others follow them in order.
    kept_pieces = sorted(i for i in keep | added if i < len(pieces))
    new_id = {old: new for new, old in enumerate(kept_pieces)}
    for offset, old in enumerate(sorted(i for i in added if i >= len(pieces))):
        new_id[old] = len(kept_pieces) + offset
    spec["model"]["vocab"] = [pieces[i] for i in kept_pieces]
    spec["model"]["unk_id"] = new_id[int(spec["model"]["unk_id"])]
    for token in spec["added_tokens"]:
        token["id"] = new_id[int(token["id"])]
    _renumber_post_processor(spec.get("post_processor"), new_id)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for stale in ("spiece.model", "added_tokens.json"):  # the slow tokenizer's full vocabulary
            (Path(folder) / stale).unlink(missing_ok=True)
        (Path(folder) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        config_path = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config.pop("added_tokens_decoder", None)  # ids of the full vocabulary
        config.pop("vocab_file", None)
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))
        compact = AutoTokenizer.from_pretrained(folder)
    log.info("compact vocabulary: %d of %d tokens kept (the pieces of the texts and of the templates' "
             "wording, single characters, special tokens and sentinels)", len(compact), len(tokenizer))
    return compact


def with_item_tokens(tokenizer, titles: Iterable[str]):
    """`tokenizer` plus one token per distinct title (`instructrec train --item-tokens`): an item the
    model learns to name becomes one id, so naming it is a single softmax over the catalogue (the
    output layer of a sequential recommender) and a history of ten titles is ten ids, not ~150 pieces.

    Each title is an added token, matched in raw text before the pieces: whole words only
    (`single_word`, so "Doom" is not found inside "Doomsday"), the spaces around it absorbed. A text
    that holds a title (an instruction's history, a candidate) takes its token; every other text,
    a new item's title included, is spelt in pieces as before. The tokenizer saved beside the weights
    carries the tokens, so the engine, the export and the job read titles as the model was trained.
    Returns a new tokenizer; `tokenizer` is left as it was."""
    import copy

    from tokenizers import AddedToken

    distinct = sorted({t for t in titles if t and t.strip()})
    extended = copy.deepcopy(tokenizer)
    before = len(extended)
    extended.add_tokens([AddedToken(t, single_word=True, lstrip=True, rstrip=True, normalized=False)
                         for t in distinct])
    log.info("item tokens: %d titles, one token each (vocabulary %d -> %d tokens)", len(distinct), before,
             len(extended))
    return extended


def without_added_titles(tokenizer):
    """The pieces of a tokenizer `with_item_tokens` extended (its special tokens kept, the title
    tokens dropped; ids unchanged, the titles' ids came last): a resumed --item-tokens run spells
    titles with it."""
    from transformers import AutoTokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token.get("special")]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        (Path(folder) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        config_path = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["added_tokens_decoder"] = {key: value for key, value in config.get("added_tokens_decoder", {}).items()
                                          if value.get("special")}
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))
        return AutoTokenizer.from_pretrained(folder)


def _renumber_post_processor(processor: dict | None, new_id: dict[int, int]) -> None:
    """The template post-processor names </s> by id: give it the compact id."""
    if not processor:
        return
    if processor.get("type") == "Sequence":
        for inner in processor.get("processors", []):
            _renumber_post_processor(inner, new_id)
        return
    for special in (processor.get("special_tokens") or {}).values():
        special["ids"] = [new_id[int(i)] for i in special["ids"]]


def vocab_rows(tokenizer) -> int:
    """The model's vocabulary size for a compact tokenizer: its length rounded up to
    VOCAB_ROWS_MULTIPLE."""
    return -(-len(tokenizer) // VOCAB_ROWS_MULTIPLE) * VOCAB_ROWS_MULTIPLE


def catalogue_titles(folder: Path) -> list[str]:
    """Every item title of a folder written by `instructrec data prepare` (its items.parquet)."""
    import pyarrow.parquet as pq

    path = Path(folder) / "items.parquet"
    if not path.is_file():
        raise InputError("vocab_catalog", f"{path} does not exist",
                         "pass a folder written by `instructrec data prepare` (it holds items.parquet)")
    schema = pq.read_schema(path)
    if "title" not in schema.names:
        raise InputError("vocab_catalog", f"{path} has no 'title' column",
                         "pass a folder written by `instructrec data prepare`")
    return [t for t in pq.read_table(path, columns=["title"]).column("title").to_pylist() if t]
