"""Shared fixtures: the real Flan-T5 tokenizer (or a generated one where shared/ is absent) and
small random-weight T5 checkpoints in `save_pretrained` layout. Nothing is downloaded."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INSTRUCTREC_SHARED", REPO_ROOT.parent / "shared"))
SHARED_TOKENIZER = SHARED / "assets" / "flan-t5-tokenizer"
SHARED_DATA = SHARED / "data"
VIDEO_GAMES_2018 = SHARED_DATA / "amazon18-video-games"
REVIEWS_2023_SAMPLE = SHARED_DATA / "amazon23-review-sample"

# flan-t5-small's architecture (shared/assets/flan-t5-tokenizer/config.json).
FLAN_T5_SMALL = dict(
    d_model=512, d_ff=1024, d_kv=64, num_layers=8, num_decoder_layers=8, num_heads=6,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
)
# Small enough to build, save and run in well under a second on 2 cores.
TINY_T5 = dict(
    d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
)


# Common English (function words, shopping and review vocabulary) so that ordinary words are one
# or two pieces, as in the real Flan-T5 vocabulary (trained on C4).
_ENGLISH = """the of and to a in is it you that he was for on are with as his they be at one have this
from or had by not word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my over know
water than call first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under name very through
just form sentence great think say help low line differ turn cause much mean before move right boy
old too same tell does set three want air well also play small end put home read hand port large
spell add even land here must big high such follow act why ask men change went light kind off need
house picture try us again animal point mother world near build self earth father head stand own
page should country found answer school grow study still learn plant cover food sun four between
state keep eye never last let thought city tree cross farm hard start might story saw far sea draw
left late run while press close night real life few north open seem together next white children
begin got walk example ease paper group always music those both mark often letter until mile river
car feet care second book carry took science eat room friend began idea fish mountain stop once base
hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red
list though feel talk bird soon body dog family direct pose leave song measure door product black
short numeral class wind question happen complete ship area half rock order fire south problem piece
told knew pass since top whole king space heard best hour better true during hundred five remember
step early hold west ground interest reach fast verb sing listen six table travel less morning ten
simple several vowel toward war lay against pattern slow center love person money serve appear road
map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark
machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead
dry wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes
distant fill east paint language among buy buyer bought shop shopper shopping purchase purchases
purchased item items recommend recommended recommendation choose chose choice candidate candidates
title titles history prefer preference preferences taste tastes intention looking search query
user users customer customers review reviews rating gift gifts present kids son daughter friends
likely next following based sequence welcome answer brief browsing category categories situation
which whose would could should likes enjoys enjoy enjoyed fun cozy relaxing story driven quests
co-op online multiplayer player players edition deluxe bundle collector extended pack series
console controller wireless wired keyboard mouse headset charger cable battery adventure racing
puzzle strategy shooter sports fighting action role playing simulation arcade classic retro new
feature compatible length standard colour describe descriptive legend gaming include box case screen
support quality price value design model version original official memory storage speed button
zombie survival horror delete manifest carriage return separator target entry entries vocabulary
execution provider cannot run file files error errors row rows column columns data table job batch
score scores rank ranking token tokens text texts field fields value values empty missing invalid
request requests response result results output input line lines count limit size group budget
instruction instructions template templates train training model models test tests check hold
expect expected match matches user users write read load save path directory config setting
update create remove keep drop split join sort filter select order first last newest oldest
character characters letter word words sentence sentences space spaces tab break unicode string
""".split()

_TEST_WORDS = """Tetris Halo Doom FIFA Mario Zelda Wild Breath Smash Bros Wii PlayStation Xbox Nintendo
Switch PC Stardew Valley Last Us Super Sky Pirates Deep Sea Quest Farm Days Galaxy Miner Command
Fleet Admiral Harbor Fishing Sim Neon Drift Turbo Kart Racer Rally Pro Street Night Space Zombie
Alpha Beta Gamma Delta Title Candidate Saga Request Answer Situation Choose Pick Recommend
""".split()

_UNICODE = ("Ünïcødé Édition: 東方 ゲーム 游戏 — Ωmega «Special» ✓ Café Über Straße Pokémon Ōkami "
            "Zoë Très bien naïve Plüsch Héros José Amélie Chloé Björn Árbol Niño – ’ “ ” … ° 🎮")


def _tokenizer_corpus(synth_dir: Path) -> list[str]:
    """What the tests feed a tokenizer: every registry template's text, the synth catalog's titles,
    category paths and review texts, English filler, digits, punctuation and the non-ASCII
    characters the tests use. Deterministic (fixed seeds)."""
    import gzip
    import json
    import random
    import re

    from instructrec.engine.templates import REGISTRY
    from instructrec.training.data.synth import synth

    rng = random.Random(0)
    lines: list[str] = []
    # The template words recur in every instruction, so they weigh as much as in real use.
    for template in REGISTRY.values():
        for pattern in (template.source, template.resolved_target_pattern):
            lines += [re.sub(r"\{[a-z_]+\}", "", pattern)] * 20
    reviews, meta = synth(synth_dir, users=150, items=200, seed=0)
    for line in gzip.open(meta, "rt", encoding="utf-8"):
        record = json.loads(line)
        title = record.get("title", "")
        if title and "<" not in title and "&" not in title:  # skip the raw-HTML variants
            lines += [title] * 3
        lines.append(", ".join(record.get("category", [])))
    for line in gzip.open(reviews, "rt", encoding="utf-8"):
        record = json.loads(line)
        lines += [record.get("reviewText", ""), record.get("summary", "")]
    # Filler sentences: some words inflected (plurals, -ing, -ed), some title-cased as in product
    # titles, so that both forms of a common word are whole pieces.
    def filler_word(word: str) -> str:
        roll = rng.random()
        if word in _ENGLISH and roll < 0.3:
            word += ("s", "ing", "ed", "er")[int(roll * 13) % 4]
        return word.capitalize() if rng.random() < 0.3 else word

    words = _ENGLISH + _TEST_WORDS
    lines += [" ".join(filler_word(w) for w in rng.choices(words, k=12)) + "." for _ in range(4000)]
    lines += [" ".join(str(rng.randrange(10 ** rng.randint(1, 4))) for _ in range(10)) for _ in range(300)]
    lines += [_UNICODE] * 5
    lines += ["0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ' \" ( ) [ ] - _ / & % $ # @ + = * < > |"] * 20
    return lines


def _generated_tokenizer(out_dir: Path):
    """A T5-style SentencePiece-like unigram tokenizer for machines without shared/assets: trained
    (under a second, deterministically) on `_tokenizer_corpus` to ~3,300 pieces, so word-level
    token counts stay close to the real Flan-T5 tokenizer's (template renderings within ~0.9-1.2x)
    and budgets tuned on it mean the same here. Same special tokens and ids as T5 (pad 0, eos 1,
    unk 2), all ids below the test models' 32128 vocabulary, and like T5 it appends </s>."""
    import json
    import tempfile

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as synth_dir:
        corpus = _tokenizer_corpus(Path(synth_dir))
    tok = Tokenizer(models.Unigram())
    # T5's precompiled normaliser (nmt_nfkc) turns control, no-break and zero-width characters
    # into spaces and collapses runs of spaces; "\u200b" then encodes to just ["▁", "</s>"].
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex("[\u0000-\u001f\u007f\u00a0\u200b-\u200d\u2060\ufeff]"), " "),
        normalizers.NFKC(),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=4000, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", shrinking_factor=0.75)
    tok.train_from_iterator(corpus, trainer)
    # The trainer's parallel sums differ between runs in the last bits of the scores, and with
    # them the order of near-tied pieces: round the scores and order the pieces by (score, text)
    # so that the ids are the same on every run.
    trained = json.loads(tok.to_str())["model"]["vocab"]
    specials, pieces = trained[:3], sorted(((p, round(s, 6)) for p, s in trained[3:]), key=lambda x: (-x[1], x[0]))
    tok.model = models.Unigram([tuple(x) for x in specials] + pieces, unk_id=2, byte_fallback=False)
    # T5TokenizerFast(tokenizer_object=...) keeps the object's post-processor: without this one
    # no </s> would close the texts and targets as it does with the real tokenizer.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    assert tok.get_vocab_size() < TINY_T5["vocab_size"]
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                           unk_token="<unk>", extra_ids=0)
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    if (SHARED_TOKENIZER / "tokenizer.json").exists():
        return SHARED_TOKENIZER
    return _generated_tokenizer(tmp_path_factory.mktemp("generated-tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def build_t5_checkpoint(out_dir: Path, tokenizer_dir: Path, shape: dict, seed: int = 0) -> Path:
    """Save a random-weight T5ForConditionalGeneration of `shape` with the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **shape)
    model = T5ForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_t5_checkpoint(tmp_path_factory.mktemp("tiny-t5"), tokenizer_dir, TINY_T5)


@pytest.fixture(scope="session")
def small_t5_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """flan-t5-small shape, random weights (77M parameters)."""
    return build_t5_checkpoint(tmp_path_factory.mktemp("flan-t5-small-shape"), tokenizer_dir, FLAN_T5_SMALL)


def write_train_and_valid(directory: Path, rows: dict) -> Path:
    """The same rows as train.parquet and valid.parquet in `directory` (created): the instruction
    folder a test's training run reads, its validation split the training rows themselves."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        pq.write_table(pa.table(rows), directory / f"{split}.parquet")
    return directory


def require_shared_data(path: Path):
    if not path.exists():
        pytest.skip(f"{path} is absent: real-data test needs ../shared/data (see its README)")
    return path


@pytest.fixture(scope="session")
def shared_dataset():
    """name -> the folder ../shared/data/<name>, or a skip naming it when it is absent."""
    return lambda name: require_shared_data(SHARED_DATA / name)


# Triton kernels (tests/kernels, and the engine when it forces use_triton) run in Triton's
# interpreter on machines without CUDA. triton.jit reads the flag when instructrec.kernels is
# imported, so it is set here, before any test module imports it; on a CUDA machine the compiled
# kernel is tested instead, unless the caller set TRITON_INTERPRET themselves.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def one_torch_thread():
    """2 cores shared by several test runs: two spinning OpenMP threads each wait on the other
    (a 10-candidate score took 8.5 s with 2 threads under load vs 0.7 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hf_log_likelihoods(model_dir: Path, instruction: str, titles: list[str]):
    """Sum of log P(title tokens | instruction) per title from a plain Hugging Face forward of the
    checkpoint in model_dir: the independent reference for scores made through the engine."""
    import torch

    tok, model = _hf_checkpoint(str(model_dir), _weights_mtime(Path(model_dir)))
    enc = tok([instruction] * len(titles), return_tensors="pt")
    labels = tok(text_target=titles, return_tensors="pt", padding=True).input_ids
    labels[labels == tok.pad_token_id] = -100
    with torch.no_grad():
        logits = model(**enc, labels=labels).logits
    logp = torch.log_softmax(logits.float(), -1)
    gathered = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (gathered * (labels != -100)).sum(-1).numpy()


@pytest.fixture(scope="session")
def hf_log_likelihoods():
    """The function (model_dir, instruction, titles) -> [len(titles)] HF log-likelihoods."""
    return _hf_log_likelihoods


def _onnx_and_torch_scores(model_dir: Path, export_dir: Path, instruction: str, titles: list[str]):
    """Export `model_dir` to ONNX in `export_dir`; the titles' scores under onnxruntime and under the
    torch backend in float32, as (onnx, torch)."""
    pytest.importorskip("onnxruntime", reason="the export needs the `onnx` extra")
    from instructrec.engine import Reranker
    from instructrec.export import export_model

    export_model(model_dir, export_dir)
    onnx = Reranker.from_pretrained(str(export_dir), backend="onnx").score(instruction, titles)
    return onnx, Reranker.from_pretrained(str(model_dir), backend="torch", dtype="float32").score(instruction, titles)


@pytest.fixture(scope="session")
def onnx_and_torch_scores():
    """The function (model_dir, export_dir, instruction, titles) -> (onnxruntime scores of its
    export, torch scores)."""
    return _onnx_and_torch_scores


def _weights_mtime(model_dir: Path) -> int:
    return max(p.stat().st_mtime_ns for p in model_dir.iterdir())


@functools.lru_cache(maxsize=4)
def _hf_checkpoint(model_dir: str, mtime_ns: int):
    """Tokenizer and model of a checkpoint, loaded once per (folder, contents' mtime)."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    return AutoTokenizer.from_pretrained(model_dir), T5ForConditionalGeneration.from_pretrained(model_dir).eval()


def populate_hf_cache(hf_home: Path, repo_id: str, files_from: Path, commit: str,
                      refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay `files_from` out as the Hugging Face cache does after a download of `repo_id` at
    `commit`: hub/models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs,
    refs/<ref>}. Returns the snapshot folder."""
    import hashlib

    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(files_from.iterdir()):
        if not file.is_file():
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


TINY_HUB_ID = "instructrec-tests/tiny-t5"
TINY_HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hf_home(tmp_path, tiny_t5_dir, monkeypatch) -> Path:
    """A fresh HF_HOME whose hub cache holds `tiny_t5_dir` as TINY_HUB_ID at TINY_HUB_COMMIT (refs
    main), with HF_HUB_OFFLINE=1: resolving TINY_HUB_ID must not touch the network."""
    home = tmp_path / "hf-home"
    populate_hf_cache(home, TINY_HUB_ID, tiny_t5_dir, TINY_HUB_COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
