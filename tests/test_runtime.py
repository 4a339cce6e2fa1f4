"""The DMC runtime: one mode object per model, the DMC config parsed once, runtime
knobs never saved, no per-layer state."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import dmc
from dmc.hf.runtime import DMCRuntime

from conftest import VOCAB, dmc_model

RUNTIME_KEYS = ("attn_implementation", "compile_pooling")


def _ids(length=24, seed=0):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _assert_no_layer_state(model):
    runtime = model.dmc_runtime
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.runtime is runtime  # one object, shared by reference
        assert attn.dmc is model.dmc_config
        for name in ("forced_period", "attn_implementation", "compile_pooling", "dmc_vanilla"):
            assert name not in vars(attn), name


def test_saved_config_holds_no_runtime_knobs(tmp_path):
    model = dmc_model("qwen2", attn_implementation="dense", compile_pooling=False)
    assert model.dmc_runtime.attn_implementation == "dense" and model.dmc_runtime.compile_pooling is False
    assert not set(RUNTIME_KEYS) & set(model.config.dmc)
    _assert_no_layer_state(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["dmc"]
    assert not set(RUNTIME_KEYS) & set(saved)
    assert saved["window"] == 4 and saved["init_offset"] == 1.0 and saved["merge_delay"] == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.dmc_runtime == DMCRuntime(config=model.dmc_config)  # runtime defaults, same semantics
    _assert_no_layer_state(loaded)


def test_old_config_with_runtime_knobs_still_loads(tmp_path):
    model = dmc_model("llama")
    ids = _ids()
    with torch.no_grad():
        expected = model(ids, use_cache=False)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dmc"].update(attn_implementation="dense", compile_pooling=False)  # as saved before the change
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # The old values become the initial runtime, and leave config.dmc (not saved again).
    assert loaded.dmc_runtime.attn_implementation == "dense" and loaded.dmc_runtime.compile_pooling is False
    assert not set(RUNTIME_KEYS) & set(loaded.config.dmc)
    assert loaded.dmc_config == model.dmc_config
    _assert_no_layer_state(loaded)
    with torch.no_grad():
        out = loaded(ids, use_cache=False)
    assert torch.equal(out.decisions, expected.decisions)
    torch.testing.assert_close(out.logits, expected.logits)
    loaded.save_pretrained(tmp_path / "again")
    assert not set(RUNTIME_KEYS) & set(json.loads((tmp_path / "again" / "config.json").read_text())["dmc"])
    # DMCConfig itself still accepts them, and leaves them out of the saved form.
    parsed = dmc.DMCConfig.from_dict(config["dmc"])
    assert parsed.attn_implementation == "dense" and not set(RUNTIME_KEYS) & set(parsed.to_dict())
    bad = {**config["dmc"], "attn_implementation": "foo"}
    with pytest.raises(ValueError, match="attn_implementation"):
        dmc.DMCConfig.from_dict(bad)


def test_mode_and_config_change_one_object():
    model = dmc_model("qwen3")
    runtime = model.dmc_runtime
    model.set_dmc_mode(vanilla=True, channel_scale=0.5, attn_implementation="sdpa")
    assert runtime.vanilla and runtime.channel_scale == 0.5 and runtime.attn_implementation == "sdpa"
    model.set_dmc_mode(vanilla=False)  # as before: back to DMC, μ = 1; other settings unchanged
    assert not runtime.vanilla and runtime.channel_scale == 1.0 and runtime.attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation"):
        model.set_dmc_mode(attn_implementation="foo")
    assert model.dmc_runtime is runtime
    model.set_dmc_config(dmc.DMCConfig(window=6, init_offset=1.0, target_cr=3.0))
    assert model.config.dmc["window"] == 6 and model.config.dmc["target_cr"] == 3.0
    assert all(layer.self_attn.dmc.window == 6 for layer in model.model.layers)
    _assert_no_layer_state(model)


def test_engine_settings_stay_off_the_layers():
    model = dmc_model("llama", window=12)
    llm = dmc.LLM(model, device="cpu", max_model_len=128, max_num_seqs=2, progress=False, forced_period=4,
                  prefill_attention="dense")
    assert model.dmc_runtime.attn_implementation == "dense" and not model.dmc_runtime.vanilla
    _assert_no_layer_state(model)
    out = llm.generate([list(range(1, 33))], dmc.SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.compression["slots"] == 9 * llm.cache.layout.rows  # ceil(35 / 4) per head: the period drives
    # The period is an argument of the engine's forwards, not model state: the HF path is unforced.
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        plain = model(ids, use_cache=False).decisions
        forced = model(ids, use_cache=False, dmc_forced_period=4).decisions
    positions = torch.arange(32)
    assert torch.equal(forced[0, 0, 0], (positions % 4 != 0).float())
    assert not torch.equal(plain, forced)
