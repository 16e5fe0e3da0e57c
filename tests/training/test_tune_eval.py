"""The weights validation ranks with: LoRA adapters merged into a CPU copy (against peft's own
merge_and_unload, on a deep copy, as the reference) without touching the training model, and a
plain T5 rebuilt from that state dict giving Hugging Face's logits."""

from __future__ import annotations

import copy

import pytest

from instructrec.training.tune_eval import plain_cpu_state_dict, t5_from_state_dict


def test_lora_merges_into_a_cpu_copy_as_peft_does():
    peft = pytest.importorskip("peft")
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from instructrec.engine.presets import shape_config

    torch.manual_seed(0)
    config = T5Config.from_dict(shape_config("t5-tiny"))
    config.dropout_rate = 0.0
    model = peft.get_peft_model(T5ForConditionalGeneration(config),
                                peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad():  # peft starts B at zero (a zero delta); give the adapters something to merge
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    merged = plain_cpu_state_dict(model.state_dict(), lora_scaling=8.0 / 4)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(merged[key], reference[key], atol=1e-6), key
    assert not torch.equal(merged["encoder.block.0.layer.0.SelfAttention.q.weight"],
                           before["base_model.model.encoder.block.0.layer.0.SelfAttention.q.base_layer.weight"])
    # The training model is untouched (still unmerged, same tensors' values).
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(t.device.type == "cpu" for t in merged.values())

    rebuilt = t5_from_state_dict(config, merged)
    assert rebuilt.shared.weight is rebuilt.encoder.embed_tokens.weight  # ties kept
    ids = torch.tensor([[37, 1566, 12, 1]])
    decoder = torch.tensor([[0, 644, 4817]])
    with torch.no_grad():
        want = model.eval()(input_ids=ids, decoder_input_ids=decoder).logits
        got = rebuilt(input_ids=ids, decoder_input_ids=decoder).logits
    assert torch.allclose(got, want, atol=1e-4)
