"""Import of Megatron-LM (Megatron-Core) checkpoints (dmc.interop.megatron, `dmc import-megatron`).

Synthetic checkpoints are written from tiny HF Llama models with the inverse mapping (HF → Megatron,
written here independently of the importer), in both layer layouts (Transformer Engine with norms
fused into the linear layers, and local), MHA and GQA, then imported back: logits must match the
original model (through ``dmc.convert`` for DMC checkpoints) to 1e-6.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import enum
import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import dmc
import dmc.cli.main
from dmc.hf.modeling import DMCLlamaForCausalLM
from dmc.interop import MegatronImportError, import_megatron

VOCAB = 61
PADDED = 64  # Megatron pads the vocabulary (make_vocab_size_divisible_by x TP)
HIDDEN, FFN, HEADS, LAYERS = 32, 48, 4, 2
DMC_ARGS = dict(dmc_init_val=1.0, dmc_window_size=4, dmc_temp=0.1, dmc_cr=4.0, dmc_finetune=True,
                dmc_is_stage_one=False, dmc_paged_cache_size=40.0, dmc_paged_block_size=256)
EXACT = dict(rtol=0.0, atol=1e-6)


# ------------------------------------------------------------------------------ building blocks
def tiny_llama(kv_heads: int = HEADS, tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama with non-trivial norms and decision channels that make DMC merge often."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=1000.0, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5, generator=g)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5, generator=g)
            d = layer.self_attn.head_dim
            for proj, spread in ((layer.self_attn.k_proj, 4.0), (layer.self_attn.q_proj, 2.0)):
                rows = proj.weight.view(-1, d, HIDDEN)
                rows[:, -1, :] = torch.randn(rows[:, -1, :].shape, generator=g) * spread / HIDDEN ** 0.5
        model.model.norm.weight.uniform_(0.5, 1.5, generator=g)
    return model


def to_megatron(model: LlamaForCausalLM, te: bool = True, padded: int = PADDED) -> dict:
    """HF Llama → Megatron-Core GPT state dict (fused qkv grouped per KV head, fused [gate; up])."""
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kv, d = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    per_group = c.num_attention_heads // kv
    g = torch.Generator().manual_seed(123)
    extra_rows = torch.randn(padded - c.vocab_size, c.hidden_size, generator=g) * 0.02
    out = {"embedding.word_embeddings.weight": torch.cat([sd["model.embed_tokens.weight"], extra_rows])}
    for i in range(c.num_hidden_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = torch.cat([sd[hf + "self_attn.q_proj.weight"].reshape(kv, per_group * d, c.hidden_size),
                         sd[hf + "self_attn.k_proj.weight"].reshape(kv, d, c.hidden_size),
                         sd[hf + "self_attn.v_proj.weight"].reshape(kv, d, c.hidden_size)], dim=1)
        out[mg + "self_attention.linear_qkv.weight"] = qkv.reshape(-1, c.hidden_size)
        out[mg + "self_attention.linear_proj.weight"] = sd[hf + "self_attn.o_proj.weight"]
        out[mg + "mlp.linear_fc1.weight"] = torch.cat([sd[hf + "mlp.gate_proj.weight"], sd[hf + "mlp.up_proj.weight"]])
        out[mg + "mlp.linear_fc2.weight"] = sd[hf + "mlp.down_proj.weight"]
        if te:
            out[mg + "self_attention.linear_qkv.layer_norm_weight"] = sd[hf + "input_layernorm.weight"]
            out[mg + "mlp.linear_fc1.layer_norm_weight"] = sd[hf + "post_attention_layernorm.weight"]
            for module in ("self_attention.core_attention", "self_attention.linear_qkv", "self_attention.linear_proj"):
                out[mg + module + "._extra_state"] = io.BytesIO(b"fp8 metadata")  # older TE
            for module in ("mlp.linear_fc1", "mlp.linear_fc2"):
                out[mg + module + "._extra_state"] = torch.zeros(3, dtype=torch.uint8)  # newer TE
        else:
            out[mg + "input_layernorm.weight"] = sd[hf + "input_layernorm.weight"]
            out[mg + "pre_mlp_layernorm.weight"] = sd[hf + "post_attention_layernorm.weight"]
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        out["output_layer.weight"] = torch.cat([sd["lm_head.weight"], extra_rows.flip(0)])
    return out


@contextlib.contextmanager
def fake_megatron():
    """A stand-in ``megatron.core.enums.ModelType`` so that ``args`` pickle as Megatron's do (the
    importer must then load them without Megatron installed)."""
    names = ("megatron", "megatron.core", "megatron.core.enums")
    saved = {n: sys.modules.get(n) for n in names}
    enums = types.ModuleType("megatron.core.enums")

    class ModelType(enum.Enum):
        encoder_or_decoder = 1
        encoder_and_decoder = 2

    ModelType.__module__, ModelType.__qualname__ = "megatron.core.enums", "ModelType"
    enums.ModelType = ModelType
    sys.modules.update({"megatron": types.ModuleType("megatron"), "megatron.core": types.ModuleType("megatron.core"),
                        "megatron.core.enums": enums})
    try:
        yield ModelType
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def megatron_args(model: LlamaForCausalLM, te: bool = True, use_dmc: bool = True, **overrides) -> dict:
    c = model.config
    gqa = c.num_key_value_heads != c.num_attention_heads
    values = dict(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, group_query_attention=gqa,
        num_query_groups=c.num_key_value_heads if gqa else 1, kv_channels=c.hidden_size // c.num_attention_heads,
        seq_length=c.max_position_embeddings, max_position_embeddings=c.max_position_embeddings,
        norm_epsilon=c.rms_norm_eps, rotary_base=1000, rotary_percent=1.0, rotary_interleaved=False,
        position_embedding_type="rope", use_rotary_position_embeddings=True, add_position_embedding=False,
        normalization="RMSNorm", swiglu=True, add_bias_linear=False, add_qkv_bias=False, apply_layernorm_1p=False,
        qk_layernorm=False, num_experts=None, untie_embeddings_and_output_weights=not c.tie_word_embeddings,
        padded_vocab_size=PADDED, make_vocab_size_divisible_by=16, tokenizer_type="Llama2Tokenizer",
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        transformer_impl="transformer_engine" if te else "local", use_legacy_models=False, bf16=False, fp16=False,
        params_dtype=torch.float32, data_path=["1.0", "wiki_text_document"],
    )
    if use_dmc:
        values.update(DMC_ARGS)
    values.update(overrides)
    return values


def save_checkpoint(root: Path, state: dict, args: dict, layout: str = "iter", iteration: int = 7) -> Path:
    """Write ``state`` and ``args`` as Megatron does; return the path to hand to the importer."""
    shard = {"iter": root / f"iter_{iteration:07d}" / "mp_rank_00", "release": root / "release" / "mp_rank_00",
             "root": root / "mp_rank_00", "file": root / "mp_rank_00", "rank_dir": root / "mp_rank_00"}[layout]
    shard.mkdir(parents=True, exist_ok=True)
    with fake_megatron() as model_type:
        namespace = argparse.Namespace(**args, model_type=model_type.encoder_or_decoder)
        torch.save({"model": state, "args": namespace, "iteration": iteration, "checkpoint_version": 3.0,
                    "num_floating_point_operations_so_far": 0}, shard / "model_optim_rng.pt")
    if layout in ("iter", "release", "root"):
        (root / "latest_checkpointed_iteration.txt").write_text("release" if layout == "release" else str(iteration))
    return {"file": shard / "model_optim_rng.pt", "rank_dir": shard}.get(layout, root)


def reference_dmc(model: LlamaForCausalLM, **overrides) -> torch.nn.Module:
    settings = dict(window=DMC_ARGS["dmc_window_size"], init_offset=DMC_ARGS["dmc_init_val"],
                    temperature=DMC_ARGS["dmc_temp"], target_cr=DMC_ARGS["dmc_cr"])
    settings.update(overrides)
    return dmc.convert(model, dmc.DMCConfig(**settings)).eval()


def ids(length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(5))


def forward(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False)


def make_tokenizer(path: Path, size: int = VOCAB) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                     eos_token="</s>")
    tokenizer.save_pretrained(path)
    return path


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("te", [True, False], ids=["te", "local"])
@pytest.mark.parametrize("kv_heads", [HEADS, 2, 1], ids=["mha", "gqa", "mqa"])
def test_dmc_round_trip(tmp_path, te, kv_heads):
    original = tiny_llama(kv_heads=kv_heads)
    ckpt = save_checkpoint(tmp_path / "ckpt", to_megatron(original, te=te), megatron_args(original, te=te))
    out = tmp_path / "hf"
    imported = import_megatron(ckpt, out, vocab_size=VOCAB)

    assert type(imported) is DMCLlamaForCausalLM
    assert imported.config.dmc == dmc.DMCConfig(window=4, init_offset=1.0, temperature=0.1, target_cr=4.0).to_dict()
    assert imported.config.num_key_value_heads == kv_heads and imported.config.vocab_size == VOCAB
    expected_model = reference_dmc(original)
    expected_state = expected_model.state_dict()
    for name, tensor in imported.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), name

    tokens = ids()
    expected = forward(expected_model, tokens)
    got = forward(imported, tokens)
    rate = float(expected.decisions.mean())
    assert 0.15 < rate < 0.85, f"merge rate {rate:.2f}: the decision channels must matter"
    torch.testing.assert_close(got.logits, expected.logits, **EXACT)
    assert torch.equal(got.decisions, expected.decisions)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is DMCLlamaForCausalLM
    torch.testing.assert_close(forward(loaded, tokens).logits, expected.logits, **EXACT)
    info = json.loads((out / "megatron_import.json").read_text())
    assert info["iteration"] == 7 and info["dmc_from_args"] and info["padded_vocab_size"] == PADDED
    assert leftovers(tmp_path) == []


def test_plain_import_of_a_non_dmc_checkpoint(tmp_path):
    original = tiny_llama(kv_heads=2)
    ckpt = save_checkpoint(tmp_path / "ckpt", to_megatron(original), megatron_args(original, use_dmc=False))
    with pytest.raises(MegatronImportError, match="not a DMC checkpoint.*--assume-dmc.*--plain"):
        import_megatron(ckpt, tmp_path / "hf", vocab_size=VOCAB)
    assert not (tmp_path / "hf").exists()

    imported = import_megatron(ckpt, tmp_path / "hf", allow_non_dmc=True, vocab_size=VOCAB)
    assert type(imported) is LlamaForCausalLM and getattr(imported.config, "dmc", None) is None
    tokens = ids()
    torch.testing.assert_close(forward(imported, tokens).logits, forward(original, tokens).logits, **EXACT)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded) is LlamaForCausalLM
    torch.testing.assert_close(forward(loaded, tokens).logits, forward(original, tokens).logits, **EXACT)


def test_assume_dmc_uses_the_default_settings(tmp_path):
    original = tiny_llama()
    ckpt = save_checkpoint(tmp_path / "ckpt", to_megatron(original), megatron_args(original, use_dmc=False))
    imported = import_megatron(ckpt, tmp_path / "hf", assume_dmc=True, vocab_size=VOCAB)
    assert imported.config.dmc == dmc.DMCConfig().to_dict()
    tokens = ids()
    expected = forward(dmc.convert(original, dmc.DMCConfig()).eval(), tokens).logits
    torch.testing.assert_close(forward(imported, tokens).logits, expected, **EXACT)


def test_a_dmc_checkpoint_stays_dmc_with_plain(tmp_path):
    original = tiny_llama()
    ckpt = save_checkpoint(tmp_path / "ckpt", to_megatron(original), megatron_args(original))
    assert type(import_megatron(ckpt, tmp_path / "hf", allow_non_dmc=True, vocab_size=VOCAB)) is DMCLlamaForCausalLM


def test_tied_embeddings_padded_vocabulary_and_tokenizer(tmp_path):
    original = tiny_llama(kv_heads=2, tied=True)
    state = to_megatron(original)
    assert "output_layer.weight" not in state
    ckpt = save_checkpoint(tmp_path / "ckpt", state, megatron_args(original))
    tokens = ids()
    expected = forward(reference_dmc(original), tokens).logits

    # A tokenizer gives the true vocabulary: the padded rows are trimmed, the tokenizer is saved.
    out = tmp_path / "with_tokenizer"
    imported = import_megatron(ckpt, out, tokenizer=make_tokenizer(tmp_path / "tok"))
    assert imported.config.vocab_size == VOCAB and imported.config.tie_word_embeddings
    assert imported.lm_head.weight is imported.model.embed_tokens.weight
    assert (imported.config.bos_token_id, imported.config.eos_token_id) == (1, 2)
    torch.testing.assert_close(forward(imported, tokens).logits, expected, **EXACT)
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == VOCAB
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(forward(loaded, tokens).logits, expected, **EXACT)

    # Without one, the padded vocabulary is kept (with a warning); the real tokens' logits agree.
    with pytest.warns(UserWarning, match="keeping all 64 embedding rows"):
        padded = import_megatron(ckpt, tmp_path / "padded")
    assert padded.config.vocab_size == PADDED
    torch.testing.assert_close(forward(padded, tokens).logits[..., :VOCAB], expected, **EXACT)

    with pytest.raises(MegatronImportError, match="larger than the checkpoint's 64 embedding rows"):
        import_megatron(ckpt, tmp_path / "too_big", tokenizer=make_tokenizer(tmp_path / "tok2", size=70))


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    original = tiny_llama()
    state = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in to_megatron(original).items()}
    ckpt = save_checkpoint(tmp_path / "ckpt", state, megatron_args(original, bf16=True, params_dtype=torch.bfloat16))
    imported = import_megatron(ckpt, tmp_path / "hf", vocab_size=VOCAB)
    assert imported.dtype == torch.bfloat16
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.dtype == torch.bfloat16
    assert import_megatron(ckpt, tmp_path / "hf32", vocab_size=VOCAB, dtype="float32").dtype == torch.float32


@pytest.mark.parametrize("layout", ["iter", "release", "root", "rank_dir", "file"])
def test_checkpoint_layouts(tmp_path, layout):
    original = tiny_llama()
    ckpt = save_checkpoint(tmp_path / "ckpt", to_megatron(original, te=False), megatron_args(original, te=False),
                           layout=layout)
    imported = import_megatron(ckpt, tmp_path / "hf", vocab_size=VOCAB)
    tokens = ids(8)
    torch.testing.assert_close(forward(imported, tokens).logits, forward(reference_dmc(original), tokens).logits,
                               **EXACT)


# ------------------------------------------------------------------------------------- refusals
def _state_with(key, value):
    def edit(state, args):
        state[key] = value
    return edit


def _args_with(**values):
    def edit(state, args):
        args.update(values)
    return edit


def _drop(key):
    def edit(state, args):
        del state[key]
    return edit


BAD_CHECKPOINTS = {
    "unknown key": (_state_with("decoder.layers.0.self_attention.linear_qkv.lora_a.weight", torch.zeros(2, 2)),
                    r"unknown key decoder\.layers\.0\.self_attention\.linear_qkv\.lora_a\.weight"),
    "bias": (_state_with("decoder.layers.1.mlp.linear_fc2.bias", torch.zeros(HIDDEN)),
             r"unexpected bias decoder\.layers\.1\.mlp\.linear_fc2\.bias"),
    "shape vs args": (_args_with(ffn_hidden_size=40),
                      r"decoder\.layers\.0\.mlp\.linear_fc1\.weight has shape \(96, 32\), expected \(80, 32\)"),
    "qkv shape vs args": (_args_with(group_query_attention=True, num_query_groups=2),
                          r"linear_qkv\.weight has shape \(96, 32\), expected \(64, 32\)"),
    "more layers than args": (_args_with(num_layers=1), r"layer 1 is beyond the checkpoint args' num_layers = 1"),
    "missing tensor": (_drop("output_layer.weight"), r"missing output_layer\.weight"),
    "missing norm": (_drop("decoder.layers.1.mlp.linear_fc1.layer_norm_weight"),
                     r"missing decoder\.layers\.1\.mlp\.linear_fc1\.layer_norm_weight"),
    "padded vocab vs args": (_args_with(padded_vocab_size=128), r"word_embeddings\.weight has shape \(64, 32\)"),
    "tensor parallel args": (_args_with(tensor_model_parallel_size=2), r"tensor-parallel.*tools/checkpoint/convert\.py"),
    "pipeline parallel args": (_args_with(pipeline_model_parallel_size=2), r"pipeline-parallel.*merge"),
    "layernorm": (_args_with(normalization="LayerNorm"), r"normalization = 'LayerNorm', expected 'RMSNorm'"),
    "partial rope": (_args_with(rotary_percent=0.5), r"rotary_percent = 0\.5"),
    "no swiglu": (_args_with(swiglu=False), r"swiglu = False"),
    "unpicklable args": (_args_with(started=datetime.date(2024, 1, 1)), r"pickles datetime\.date.*--trust-pickle"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, case):
    edit, message = BAD_CHECKPOINTS[case]
    original = tiny_llama()
    state, args = to_megatron(original), megatron_args(original)
    edit(state, args)
    ckpt = save_checkpoint(tmp_path / "ckpt", state, args)
    with pytest.raises(MegatronImportError, match=message) as error:
        import_megatron(ckpt, tmp_path / "hf")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_trust_pickle_loads_what_weights_only_refuses(tmp_path):
    original = tiny_llama()
    args = megatron_args(original, started=datetime.date(2024, 1, 1))
    ckpt = save_checkpoint(tmp_path / "ckpt", to_megatron(original), args)
    with fake_megatron():  # the unrestricted unpickler needs the real class
        assert type(import_megatron(ckpt, tmp_path / "hf", vocab_size=VOCAB, trust_pickle=True)) is DMCLlamaForCausalLM


@pytest.mark.parametrize("shards, message", [
    (["mp_rank_00", "mp_rank_01"], r"tensor-parallel checkpoint \(2 shards: mp_rank_00, mp_rank_01\).*merge"),
    (["mp_rank_00_000", "mp_rank_00_001"], r"pipeline-parallel checkpoint \(2 shards.*merge"),
])
def test_sharded_checkpoint_directories_are_refused(tmp_path, shards, message):
    root = tmp_path / "ckpt"
    for shard in shards:
        (root / "iter_0000007" / shard).mkdir(parents=True)
        (root / "iter_0000007" / shard / "model_optim_rng.pt").write_bytes(b"")
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(MegatronImportError, match=message):
        import_megatron(root, tmp_path / "hf")


def test_distributed_and_missing_checkpoints_are_refused(tmp_path):
    dist = tmp_path / "dist" / "iter_0000007"
    dist.mkdir(parents=True)
    (dist / "common.pt").write_bytes(b"")
    (dist / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(MegatronImportError, match="distributed .*checkpoint"):
        import_megatron(dist, tmp_path / "hf")
    with pytest.raises(MegatronImportError, match="does not exist"):
        import_megatron(tmp_path / "nowhere", tmp_path / "hf")
    (tmp_path / "iters" / "iter_0000001").mkdir(parents=True)
    with pytest.raises(MegatronImportError, match="no latest_checkpointed_iteration.txt; pass one of .*iter_0000001"):
        import_megatron(tmp_path / "iters", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_output_directory_rules(tmp_path):
    original = tiny_llama()
    ckpt = save_checkpoint(tmp_path / "ckpt", to_megatron(original), megatron_args(original))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(MegatronImportError, match="not empty; pass --force"):
        import_megatron(ckpt, out, vocab_size=VOCAB)
    assert (out / "precious.txt").read_text() == "keep me"

    import_megatron(ckpt, out, vocab_size=VOCAB, force=True)
    assert not (out / "precious.txt").exists() and (out / "config.json").exists()
    assert leftovers(tmp_path) == []

    (tmp_path / "empty").mkdir()
    import_megatron(ckpt, tmp_path / "empty", vocab_size=VOCAB)  # an empty directory is fine
    with pytest.raises(MegatronImportError, match="contains the checkpoint"):
        import_megatron(ckpt, tmp_path / "ckpt", vocab_size=VOCAB, force=True)


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    original = tiny_llama()
    ckpt = save_checkpoint(tmp_path / "ckpt", to_megatron(original), megatron_args(original))
    real_save = DMCLlamaForCausalLM.save_pretrained

    def save_then_fail(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(DMCLlamaForCausalLM, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        import_megatron(ckpt, tmp_path / "hf", vocab_size=VOCAB)
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli():
    return dmc.cli.main.main


def test_cli_imports_and_reports(tmp_path, cli, capsys):
    original = tiny_llama(kv_heads=2)
    ckpt = save_checkpoint(tmp_path / "ckpt", to_megatron(original), megatron_args(original))
    out = tmp_path / "hf"
    assert cli(["import-megatron", str(ckpt), "--out", str(out), "--tokenizer",
                str(make_tokenizer(tmp_path / "tok"))]) == 0
    printed = capsys.readouterr()
    assert "wrote DMC Llama" in printed.out and "vocab 61" in printed.out and "window 4" in printed.out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = ids()
    torch.testing.assert_close(forward(loaded, tokens).logits, forward(reference_dmc(original), tokens).logits,
                               **EXACT)

    # no tokenizer: the padded vocabulary is kept, and said so
    assert cli(["import-megatron", str(ckpt), "--out", str(tmp_path / "padded")]) == 0
    assert "note: no tokenizer given: keeping all 64 embedding rows" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, cli, capsys):
    original = tiny_llama()
    ckpt = save_checkpoint(tmp_path / "ckpt", to_megatron(original), megatron_args(original, use_dmc=False))
    out = tmp_path / "hf"
    assert cli(["import-megatron", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a DMC checkpoint" in err and err.count("\n") == 1
    assert "Traceback" not in err and not out.exists()

    assert cli(["import-megatron", str(ckpt), "--out", str(out), "--plain", "--vocab-size", str(VOCAB)]) == 0
    assert "wrote Llama (no DMC)" in capsys.readouterr().out
    assert cli(["import-megatron", str(ckpt), "--out", str(out), "--plain"]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert cli(["import-megatron", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert cli(["import-megatron", str(ckpt), "--out", str(tmp_path / "y"), "--tokenizer", str(tmp_path)]) == 2
    assert "cannot load a tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --plain and --assume-dmc exclude each other
        cli(["import-megatron", str(ckpt), "--out", str(out), "--plain", "--assume-dmc"])
