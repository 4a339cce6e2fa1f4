"""GQA conversion by mean pooling of K/V heads (spec §8)."""

import pytest
import torch
import transformers
from conftest import VOCAB, stock_model

import dmc
from dmc.baselines import mean_pool_kv_heads


@pytest.mark.parametrize("family,ratio", [("llama", 2), ("llama", 4), ("qwen2", 2), ("qwen3", 2)])
def test_mean_pooling_is_exact(family, ratio, tmp_path):
    model = stock_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gqa = mean_pool_kv_heads(model, ratio).eval()
    heads, d = model.config.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    assert gqa.config.num_key_value_heads == heads // ratio
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    x = torch.randn(3, 5, model.config.hidden_size)
    for old, new in zip(model.model.layers, gqa.model.layers):
        for name in ("k_proj", "v_proj"):
            full = getattr(old.self_attn, name)(x).view(3, 5, heads // ratio, ratio, d).mean(3)
            pooled = getattr(new.self_attn, name)(x).view(3, 5, heads // ratio, d)
            torch.testing.assert_close(pooled, full)  # the projection of the mean = the mean of projections
    gqa.save_pretrained(tmp_path)  # a stock model that reloads as such
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, gqa(ids).logits)


def test_mean_pooling_errors():
    with pytest.raises(ValueError, match="divisor of 4"):
        mean_pool_kv_heads(stock_model("llama"), 3)
    with pytest.raises(dmc.UnsupportedModelError):
        mean_pool_kv_heads(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)), 2)


def test_gqa_cli(tmp_path, capsys):
    from dmc.cli.main import main
    stock_model("qwen2").save_pretrained(tmp_path / "base")
    assert main(["gqa", str(tmp_path / "base"), "--ratio", "2", "--out", str(tmp_path / "gqa")]) == 0
    assert transformers.AutoConfig.from_pretrained(tmp_path / "gqa").num_key_value_heads == 1
    capsys.readouterr()
    assert main(["gqa", str(tmp_path / "base"), "--ratio", "3", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: cannot mean-pool 2 KV heads into groups of 3")
