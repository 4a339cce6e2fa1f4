"""DMC attention in training mode: Gumbel-sigmoid decisions, compression loss, gradients, FlexAttention vs dense."""

import pytest
import torch
from conftest import VOCAB, dmc_model



def _ids(batch=2, length=24, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decision_rows_grad(model):
    attn = model.model.layers[0].self_attn
    d = attn.head_dim
    k_rows = attn.k_proj.weight.grad.view(-1, d, attn.k_proj.weight.shape[-1])[:, -1]
    q_rows = attn.q_proj.weight.grad.view(-1, d, attn.q_proj.weight.shape[-1])[:, -1]
    return k_rows, q_rows


def test_training_forward_adds_compression_loss_and_reaches_decisions(family):
    model = dmc_model(family, window=4, target_cr=8.0).train()
    ids = _ids()
    out = model(ids, labels=ids, dmc_generator=torch.Generator().manual_seed(0))
    assert out.compression_loss > 0  # merge rate ~0.4 < 1 - 1/8
    torch.testing.assert_close(out.loss, out.lm_loss + out.compression_loss)
    assert out.decisions.shape == (2, 2, model.config.num_key_value_heads, 24)
    assert set(out.decisions.detach().unique().tolist()) <= {0.0, 1.0}  # α̂ is hard in value
    assert out.compression.per_head_cr.shape == (2, model.config.num_key_value_heads)
    out.compression_loss.backward()
    k_rows, q_rows = _decision_rows_grad(model)
    assert k_rows.abs().sum() > 0  # the loss pushes the decision logits
    model.zero_grad()
    model(ids, labels=ids, dmc_generator=torch.Generator().manual_seed(0)).lm_loss.backward()
    k_rows, q_rows = _decision_rows_grad(model)
    assert k_rows.abs().sum() > 0 and q_rows.abs().sum() > 0  # LM loss reaches α (bias, pooling) and ω


def test_training_noise_is_seeded_and_target_override():
    model = dmc_model("llama", window=4).train()
    ids = _ids()
    a = model(ids, labels=ids, dmc_target_cr=2.0, dmc_generator=torch.Generator().manual_seed(7))
    b = model(ids, labels=ids, dmc_target_cr=2.0, dmc_generator=torch.Generator().manual_seed(7))
    c = model(ids, labels=ids, dmc_target_cr=2.0, dmc_generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.loss, b.loss) and not torch.equal(a.loss, c.loss)
    assert a.target_cr == 2.0
    assert model(ids, labels=ids).compression_loss is None  # no target configured


def test_activation_checkpointing_keeps_noise_and_gradients():
    grads = []
    for checkpointing in (False, True):
        model = dmc_model("qwen2", window=4, target_cr=4.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
        ids = _ids()
        model(ids, labels=ids, dmc_generator=torch.Generator().manual_seed(1)).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_relaxed_decisions_at_low_temperature_match_eval_mode():
    """With τ → 0 and no noise the relaxed model is the hard one: training maths = eval maths."""
    model = dmc_model("qwen2", window=4, temperature=1e-4)
    ids = _ids()
    with torch.no_grad():
        hard = model(ids, use_cache=False).logits
        model.train()
        zero_noise = _ZeroNoise()
        with zero_noise:
            soft = model(ids).logits
    assert zero_noise.calls > 0
    torch.testing.assert_close(soft, hard, rtol=1e-4, atol=1e-4)


class _ZeroNoise:
    """Replace the Gumbel noise by zeros for the duration of a block."""

    def __enter__(self):
        from dmc import core
        self.calls, self._orig, self._core = 0, core.logistic_noise, core

        def zeros(shape, generator=None, device=None):
            self.calls += 1
            return torch.zeros(shape, device=device)
        core.logistic_noise = zeros
        return self

    def __exit__(self, *exc):
        self._core.logistic_noise = self._orig


def test_packed_documents_equal_separate_sequences():
    model = dmc_model("llama", window=4)
    docs = [_ids(1, n, seed=n)[0] for n in (9, 14, 7)]
    packed = torch.cat(docs)[None]
    document_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        out = model(packed, document_ids=document_ids, position_ids=positions, use_cache=False)
        start = 0
        for d in docs:
            alone = model(d[None], use_cache=False)
            torch.testing.assert_close(out.logits[0, start:start + len(d)], alone.logits[0], rtol=1e-4, atol=2e-5)
            assert torch.all(out.decisions[0, :, :, start] == 0)  # no merge across the boundary
            start += len(d)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_flex_attention_matches_dense_forward(family):
    """Values on CPU (FlexAttention has no CPU backward); gradients in the GPU test below."""
    dense = dmc_model(family, window=4, attn_implementation="dense").train()
    flex = dmc_model(family, window=4, attn_implementation="flex").train()
    ids = _ids(length=40)
    docs = torch.tensor([[0] * 25 + [1] * 15, [0] * 40])
    with torch.no_grad():
        for document_ids in (None, docs):
            a = dense(ids, labels=ids, document_ids=document_ids, dmc_generator=torch.Generator().manual_seed(3))
            b = flex(ids, labels=ids, document_ids=document_ids, dmc_generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
def test_flex_attention_matches_dense_gradients_on_gpu():
    torch.manual_seed(0)
    grads = {}
    for impl in ("dense", "flex"):
        model = dmc_model("qwen2", window=4, attn_implementation=impl).cuda().train()
        ids = _ids(length=128).cuda()
        docs = torch.tensor([[0] * 70 + [1] * 58, [0] * 128]).cuda()
        out = model(ids, labels=ids, document_ids=docs, dmc_target_cr=4.0,
                    dmc_generator=torch.Generator(device="cuda").manual_seed(5))
        out.loss.backward()
        grads[impl] = (out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["flex"][0], grads["dense"][0], rtol=1e-4, atol=1e-5)
    for name, g in grads["dense"][1].items():
        torch.testing.assert_close(grads["flex"][1][name], g, rtol=1e-3, atol=1e-5, msg=name)
    k_rows = grads["flex"][1]["model.layers.0.self_attn.k_proj.weight"].view(-1, 16, 64)[:, -1]
    assert k_rows.abs().sum() > 0
