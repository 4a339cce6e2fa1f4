"""GPU smoke test of delayed merging (merge_delay > 0) before a study spends device time on it: on CUDA, the
compiled FlexAttention training form equals the dense bias form (values and gradients), a training step of a
tiny DMC Llama runs in bf16 with packed documents, and the cache decodes like the full sequence."""

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dmc
from dmc import core
from dmc.hf.attention import biased_attend, delayed_block_mask, flex_attend_delayed


def main() -> int:
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    torch.manual_seed(0)
    b, h, g, n, d, delay = 2, 3, 3, 256, 64, 32
    q = torch.randn(b, h * g, n, d, device=dev, requires_grad=True)
    k_bar, k_raw, v_bar, v_raw = (torch.randn(b, h, n, d, device=dev) for _ in range(4))
    logits = torch.randn(b, h, n, device=dev, requires_grad=True)
    docs = torch.zeros(b, n, dtype=torch.long, device=dev)
    docs[:, 150:] = 1
    key_bias = torch.nn.functional.logsigmoid(-logits)
    if dev.type == "cuda":  # FlexAttention has no backward on CPU
        check_flex(q, k_bar, v_bar, k_raw, v_raw, key_bias, logits, docs, b, n, delay, dev)
    model_checks(dev, delay)
    print("delay smoke: ok")
    return 0


def check_flex(q, k_bar, v_bar, k_raw, v_raw, key_bias, logits, docs, b, n, delay, dev):
    mask = delayed_block_mask(docs, b, n, delay, dev)
    flex = flex_attend_delayed(q, k_bar, v_bar, k_raw, v_raw, key_bias, delay, 0.125, mask)
    dense = biased_attend(q, torch.cat([k_bar, k_raw], -2), torch.cat([v_bar, v_raw], -2),
                          core.delayed_dense_bias(key_bias, delay, docs), 0.125)
    gf = torch.autograd.grad(flex.sum(), logits, retain_graph=True)[0]
    gd = torch.autograd.grad(dense.sum(), logits)[0]
    print("flex vs dense: max |out| diff", float((flex - dense).abs().max()), "max |grad| diff", float((gf - gd).abs().max()))
    torch.testing.assert_close(flex, dense, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gf, gd, rtol=2e-3, atol=2e-3)


def model_checks(dev, delay):

    cfg = LlamaConfig(vocab_size=500, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=1024)
    model = dmc.convert(LlamaForCausalLM(cfg), dmc.DMCConfig(init_offset=0.0, merge_delay=delay)).to(dev)
    ids = torch.randint(0, 500, (2, 512), device=dev)
    model.train()
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        out = model(ids, labels=ids, document_ids=(torch.arange(512, device=dev) >= 300).long().expand(2, -1),
                    dmc_target_cr=4.0, dmc_generator=torch.Generator(dev).manual_seed(0))
    out.loss.backward()
    print("training step: loss", float(out.loss), "merge rate", float(out.decisions.mean()))
    assert torch.isfinite(out.loss)
    model.eval()
    with torch.no_grad():
        full = model(ids, use_cache=False)
        cache, parts = None, []
        for t in range(0, 512, 128):
            o = model(ids[:, t:t + 128], past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            parts.append(o.logits)
    diff = float((torch.cat(parts, 1) - full.logits).abs().max())
    print("cache vs full sequence: max |logit| diff", diff, "CR", dmc.CompressionStats.from_cache(cache).overall_cr)
    assert diff < 1e-2


if __name__ == "__main__":
    sys.exit(main())
