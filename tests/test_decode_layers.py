"""The decode step's fused projections and norms (dmc.engine.layers) compute what the HF modules do (the engine
end to end with them: test_engine.py's greedy-equals-HF tests)."""

import pytest
import torch
from conftest import stock_model

from dmc.engine.layers import DecodeOps, add_rms_norm, fuse_projections, gated_activation, is_rms_norm


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_fused_projections_are_the_modules_weights(name):
    """q/k/v and gate/up become views of one tensor each: the same numbers, no second copy, the module outputs
    unchanged; a second fusion (another runner on the same model) reuses the tensors."""
    model = stock_model(name)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.randn(5, model.config.hidden_size)
    before = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp(x)]
    logits = model(torch.arange(7)[None]).logits

    fused = fuse_projections(layer)
    for lin, start in ((attn.q_proj, 0), (attn.k_proj, fused.split[0]), (attn.v_proj, sum(fused.split[:2]))):
        assert lin.weight.data_ptr() == fused.qkv_weight[start:].data_ptr()  # a view, not a copy
    assert mlp.up_proj.weight.data_ptr() == fused.gate_up_weight[mlp.gate_proj.out_features:].data_ptr()
    assert (fused.qkv_bias is not None) == (name == "qwen2")  # Qwen2's q/k/v biases are fused too
    for got, want in zip(fused.qkv(x), before[:3]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(DecodeOps(torch.device("cpu")).mlp(layer, fused, x), before[3])
    torch.testing.assert_close(model(torch.arange(7)[None]).logits, logits)  # the HF path reads the views
    assert len(dict(model.named_parameters())) == len(model.state_dict())  # no extra state
    again = fuse_projections(layer)
    assert again.qkv_weight is fused.qkv_weight and again.gate_up_weight is fused.gate_up_weight


def test_add_rms_norm_is_the_hf_norm_of_the_sum():
    model = stock_model("llama")
    norm = model.model.layers[0].post_attention_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    assert is_rms_norm(norm)
    for dtype in (torch.float32, torch.bfloat16):
        h, d = torch.randn(2, 4, 64).to(dtype), torch.randn(2, 4, 64).to(dtype)
        total, normed = add_rms_norm(h, d, norm.weight.to(dtype), norm.variance_epsilon)
        assert torch.equal(total, h + d)
        assert torch.equal(normed, norm.to(dtype)(h + d))  # the same ops in the same order: the same bits
    act = model.model.layers[0].mlp.act_fn
    gate_up = torch.randn(3, 2 * 96)
    torch.testing.assert_close(gated_activation(gate_up, act), act(gate_up[:, :96]) * gate_up[:, 96:], rtol=0, atol=0)

