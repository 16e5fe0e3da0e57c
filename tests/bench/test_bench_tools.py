"""The bench's side tools on a tiny checkpoint folder (a `--model` spelling of its own): the
interleaved precision comparison and the engine profile. Figures are printed, never asserted;
what is checked is what they are computed from."""

from __future__ import annotations

import pytest

from instructrec.bench import precisions, profile_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_precisions_compare_every_precision_with_fp32(tiny_t5_dir, tmp_path):
    report = precisions.compare(str(tiny_t5_dir), n_requests=2, rounds=1, threads=1, seed=0, cache=tmp_path)
    assert set(report["precisions"]) == {"float32", "bfloat16", "int8"}
    fp32 = report["precisions"]["float32"]
    assert fp32["top1_vs_fp32"] == 1.0 and fp32["kendall_tau_vs_fp32"] == 1.0
    for p in report["precisions"].values():
        assert len(p["candidates_per_s_rounds"]) == 1 and p["candidates_per_s_median"] > 0
        assert -1 <= p["kendall_tau_vs_fp32"] <= 1
    assert report["auto_resolves_to"] in ("float32", "bfloat16")
    assert "| int8 |" in precisions.to_markdown(report)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_profile_groups_the_operators(tiny_t5_dir, tmp_path, dtype):
    report = profile_engine.profile(str(tiny_t5_dir), dtype, n_requests=2, threads=1, seed=0, cache=tmp_path)
    assert report["candidates"] == 20 and report["model_gflop"] > 0
    assert "matmuls (projections, FFN)" in report["operator_ms"]
    groups = report["operator_ms"]  # each rounded to 0.1 ms
    assert report["operator_total_ms"] == pytest.approx(sum(groups.values()), abs=0.1 * len(groups))
    if dtype == "float32":  # the fp32 matmuls split by the weight they multiply
        assert {"FFN in (gate and linear fused)", "FFN out", "self-attention q,k,v (fused)"} <= \
            set(report["matmul_by_weight"])
    assert "| part | CPU ms | share |" in profile_engine.to_markdown(report)
