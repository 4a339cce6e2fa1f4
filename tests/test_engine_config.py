"""EngineConfig: the keywords of LLM and the engine flags of the commands are its fields."""

from __future__ import annotations

import argparse
import dataclasses
import pickle

import pytest
from conftest import dmc_model

import dmc
from dmc.baselines.eviction import EvictionPolicy
from dmc.cli._engine_args import add_engine_arguments
from dmc.engine.config import EngineConfig, flag_of

CPU = dict(device="cpu", max_model_len=64, max_num_seqs=4, cuda_graphs=False)


def test_a_config_and_the_keywords_build_the_same_engine():
    model = dmc_model("llama")
    by_keywords = dmc.LLM(model, progress=False, **CPU)
    by_config = dmc.LLM(model, config=EngineConfig(**CPU), progress=False)
    assert by_keywords.config == by_config.config == EngineConfig(**CPU)
    assert by_keywords.cache.layout.num_pages == by_config.cache.layout.num_pages
    # keywords change a given config
    assert dmc.LLM(model, config=EngineConfig(**CPU), max_num_seqs=2, progress=False).config.max_num_seqs == 2
    with pytest.raises(TypeError, match="unknown engine setting max_num_seq;"):
        dmc.LLM(model, max_num_seq=2, **CPU)


def test_an_eviction_policy_keyword_sets_the_eviction_fields():
    for policy in (EvictionPolicy("h2o", 8, recent=2), EvictionPolicy("tova", 8),
                   EvictionPolicy("snapkv", 8, window=3, pooling="avg", kernel=3)):
        config = EngineConfig().replace(eviction=policy)
        config.validate()
        assert config.eviction_policy() == policy
    assert EngineConfig().eviction_policy() is None


def test_the_flags_are_the_fields_with_their_defaults():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["model"])
    for setting in dataclasses.fields(EngineConfig):
        if "help" in setting.metadata:
            assert getattr(args, setting.name) == setting.default, setting.name
            assert flag_of(setting.name) in parser._option_string_actions
    assert args.kv_cache_memory_gib is None and args.no_cuda_graphs is False
    assert flag_of("kv_cache_memory") == "--kv-cache-memory-gib" and flag_of("admission_margin") is None


@pytest.mark.parametrize("settings,python,cli", [
    (dict(max_num_seqs=0), "max_num_seqs must be an integer >= 1, got 0 (--max-num-seqs)",
     "--max-num-seqs must be >= 1, got 0"),
    (dict(prefill_chunk=0), "prefill_chunk must be an integer >= 1, got 0 (--prefill-chunk)",
     "--prefill-chunk must be >= 1, got 0"),
    (dict(admission_margin=-1), "admission_margin must be a number > -1, got -1", None),
    (dict(vanilla=True, forced_period=2), "vanilla=True and forced_period are exclusive",
     "--vanilla and --forced-cr are exclusive"),
    (dict(eviction_recent=2), "eviction_recent needs eviction h2o|tova|snapkv",
     "--eviction-recent needs --eviction h2o|tova|snapkv"),
    (dict(prefill_attention="eager"), "prefill_attention must be auto, flex, sdpa or dense", None),
])
def test_a_message_names_the_argument_or_the_flag(settings, python, cli):
    config = EngineConfig(**settings)
    with pytest.raises(ValueError) as refused:
        config.validate()
    assert python in str(refused.value)
    if cli is not None:
        with pytest.raises(ValueError) as refused:
            config.validate(flags=True)
        assert cli in str(refused.value)


def test_a_config_travels_to_an_engine_process():
    config = EngineConfig(**CPU, eviction="h2o", eviction_budget=8)
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_num_seqs = 8
