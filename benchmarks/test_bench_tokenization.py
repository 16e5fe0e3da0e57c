"""pytest-benchmark suite for tokenization and instruction formatting on the bench's rerank-10
inputs: the Hugging Face fast tokenizer one text at a time (as hf-per-pair and a naive peer do)
against one batched call (as the engine and hf-batched do), and the engine's `build_instruction`
(template + history budget, which tokenizes to count).

    pytest benchmarks/test_bench_tokenization.py --benchmark-only
"""

from __future__ import annotations

import pytest

from instructrec.bench.workloads import SHARED_TOKENIZER, instruction_text, make_requests

N_REQUESTS = 32


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    if not (SHARED_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"{SHARED_TOKENIZER} is absent: set INSTRUCTREC_SHARED")
    return AutoTokenizer.from_pretrained(SHARED_TOKENIZER)


@pytest.fixture(scope="module")
def requests():
    return make_requests(N_REQUESTS, 20, 10, seed=0)


@pytest.fixture(scope="module")
def texts(requests, tokenizer):
    return [instruction_text(r, None, tokenizer) for r in requests]


def test_build_instruction(benchmark, requests, tokenizer):
    out = benchmark(lambda: [instruction_text(r, None, tokenizer) for r in requests])
    assert all("Past purchases" in t for t in out)


@pytest.mark.parametrize("mode", ["per-text", "batched"])
def test_tokenize_instructions(benchmark, tokenizer, texts, mode):
    if mode == "per-text":
        ids = benchmark(lambda: [tokenizer(t).input_ids for t in texts])
    else:
        ids = benchmark(lambda: tokenizer(texts).input_ids)
    assert ids == [tokenizer(t).input_ids for t in texts]


@pytest.mark.parametrize("mode", ["per-text", "batched"])
def test_tokenize_titles(benchmark, tokenizer, requests, mode):
    titles = [t for r in requests for t in r.candidates]
    if mode == "per-text":
        ids = benchmark(lambda: [tokenizer(text_target=t).input_ids for t in titles])
    else:
        ids = benchmark(lambda: tokenizer(text_target=titles).input_ids)
    assert all(x[-1] == tokenizer.eos_token_id for x in ids) and len(ids) == len(titles)
