"""Shared fixtures: the real Flan-T5 tokenizer (or a generated one where shared/ is absent) and
small random-weight T5 checkpoints in `save_pretrained` layout. Nothing is downloaded."""

from __future__ import annotations

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


def _generated_tokenizer(out_dir: Path):
    """A T5-style unigram tokenizer trained on a few generated sentences (ids fit a 32128 vocab),
    for machines without shared/assets. Same special tokens and ids as T5: pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    words = ("game controller wireless mouse keyboard edition deluxe console racing puzzle "
             "strategy adventure headset charger cable remote fantasy quest legend battle "
             "space station zombie soccer music dance kids family party gift").split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(400)]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
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


def require_shared_data(path: Path):
    if not path.exists():
        pytest.skip(f"{path} is absent: real-data test needs ../shared/data (see its README)")
    return path


# Triton kernels (tests/kernels, and the engine when it forces use_triton) run in Triton's
# interpreter on machines without CUDA. triton.jit reads the flag when instructrec.kernels is
# imported, so it is set here, before any test module imports it; on a CUDA machine the compiled
# kernel is tested instead, unless the caller set TRITON_INTERPRET themselves.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
