"""GQA up-training (spec §8): `dmc gqa` mean-pools K/V heads, then `dmc retrofit --method plain`
continues training the stock model on the LM loss alone, with the DMC run's plan and machinery."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import transformers

from dmc.cli.main import main as cli
from dmc.tiny import write_tiny_model_dir
from dmc.train import ConfigError, Retrofitter, TrainConfig
from dmc.train.data import PackedData

WORDS = ["the", "cache", "grows", "with", "every", "token", "and", "each", "step", "reads", "all", "of", "it", "so",
         "heads", "merge", "keys", "into", "slots", "while", "values", "follow", "the", "same", "weights", "and",
         "model", "learns", "when", "to", "append"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    """Forty short documents of a tiny vocabulary: a random model's loss falls fast on them."""
    root = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        words = [WORDS[j] for j in torch.randint(len(WORDS), (int(torch.randint(20, 80, (1,), generator=g)),),
                                                 generator=g)]
        (root / f"doc{i:02d}.txt").write_text(" ".join(words) + ".\n")
    return root


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory, corpus) -> pathlib.Path:
    """A tiny MHA Llama (4 KV heads) pooled by `dmc gqa --ratio 2` into 2 KV heads."""
    root = tmp_path_factory.mktemp("gqa")
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    write_tiny_model_dir(root / "mha", texts, vocab_size=300, heads=4, kv_heads=4, max_positions=256)
    assert cli(["gqa", str(root / "mha"), "--ratio", "2", "--out", str(root / "gqa2")]) == 0
    return root / "gqa2"


def _config(model, out, corpus, token_cache, **kw) -> TrainConfig:
    values = {"model": str(model), "data": [str(corpus)], "out": str(out), "method": "plain", "target_cr": 2.0,
              "seq_len": 64, "micro_batch_size": 4, "lr": 3e-3, "zero_out_steps": 2, "retrofit_steps": 6,
              "finetune_steps": 4, "eval_every": 4, "val_fraction": 0.1, "token_cache": str(token_cache),
              "progress": False, "tensorboard": False}
    values.update(kw)
    return TrainConfig(**values)


def _records(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def test_stock_attention_keeps_packed_documents_apart(gqa_model):
    """Plain training feeds stock models packed rows without document_ids: transformers' masks must
    still keep the documents apart (from the per-document position_ids)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gqa_model).eval()
    a, b = torch.randint(3, 200, (1, 10)), torch.randint(3, 200, (1, 14))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=positions, use_cache=False).logits
        alone = model(b, use_cache=False).logits
    torch.testing.assert_close(together[:, 10:], alone, rtol=1e-4, atol=1e-4)


def test_gqa_uptraining_with_the_plain_method(gqa_model, corpus, tmp_path, capsys):
    out = tmp_path / "up"
    assert cli(["retrofit", str(gqa_model), "--method", "plain", "--data", str(corpus), "--out", str(out),
                "--target-cr", "2", "--seq-len", "64", "--micro-batch-size", "4", "--lr", "3e-3",
                "--zero-out-steps", "2", "--retrofit-steps", "6", "--finetune-steps", "4", "--hard-steps", "0",
                "--eval-every", "4",
                "--val-fraction", "0.1", "--token-cache", str(tmp_path / "tok"), "--no-progress",
                "--no-tensorboard"]) == 0
    assert "a stock model" in capsys.readouterr().out
    records = _records(out)
    assert [r["step"] for r in records] == list(range(1, 13))  # the DMC run's plan: 2 + 6 + 4 steps
    assert [r["stage"] for r in records] == ["zero-out"] * 2 + ["retrofit"] * 6 + ["finetune"] * 4
    for r in records:  # the same numbers as a DMC run, less the compression ones
        assert {"lm_loss", "lr", "grad_norm", "tokens_per_s", "memory_gib"} <= set(r)
        assert not {"cr_loss", "target_cr", "achieved_cr", "per_layer_cr", "channel_scale", "val_cr"} & set(r)
    assert records[-1]["lr"] == pytest.approx(3e-6)  # the fine-tune cosine ran
    assert sum(r["lm_loss"] for r in records[-3:]) < sum(r["lm_loss"] for r in records[:3]) - 1.5
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]
    # a stock model with the pooled KV heads, loadable without dmc
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is transformers.LlamaForCausalLM and not hasattr(model.config, "dmc")
    assert model.config.num_key_value_heads == 2
    assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == 2 * model.config.head_dim
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the cache grows with every token", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_plain_run_resumes_exactly(gqa_model, corpus, tmp_path):
    plan = {"zero_out_steps": 1, "retrofit_steps": 3, "finetune_steps": 2, "save_every": 2, "eval_every": 2}
    straight = tmp_path / "straight"
    Retrofitter(_config(gqa_model, straight, corpus, tmp_path / "tok", **plan)).run()
    stopped = tmp_path / "stopped"
    assert Retrofitter(_config(gqa_model, stopped, corpus, tmp_path / "tok", max_steps=3, **plan)).run() is None
    assert not (stopped / "config.json").exists()
    with pytest.raises(ConfigError, match="different run .*method"):  # a DMC run cannot pick it up
        Retrofitter(_config(gqa_model, stopped, corpus, tmp_path / "tok", method="dmc", resume=True, **plan))
    assert Retrofitter(_config(gqa_model, stopped, corpus, tmp_path / "tok", resume=True, **plan)).run() == stopped
    a = transformers.AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(stopped).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    drop = ("tokens_per_s", "memory_gib")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]
    assert strip(_records(straight)) == strip(_records(stopped))


def test_plain_method_errors(gqa_model, corpus, tmp_path):
    import dmc
    dmc_dir = tmp_path / "dmc"
    dmc.convert(transformers.AutoModelForCausalLM.from_pretrained(gqa_model)).save_pretrained(dmc_dir)
    transformers.AutoTokenizer.from_pretrained(gqa_model).save_pretrained(dmc_dir)
    with pytest.raises(ConfigError, match="holds a DMC model; --method plain trains stock models"):
        Retrofitter(_config(dmc_dir, tmp_path / "e1", corpus, tmp_path / "tok"))
    with pytest.raises(ConfigError, match="unknown method 'gqa'"):
        Retrofitter(_config(gqa_model, tmp_path / "e2", corpus, tmp_path / "tok", method="gqa"))


def test_packed_rows_restart_positions_per_document(corpus, gqa_model, tmp_path):
    """What the packed-mask test above relies on: the trainer's rows restart positions per document."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(gqa_model)
    data = PackedData.from_sources([str(corpus)], tokenizer, 64, 0.0, 0, cache_dir=str(tmp_path), progress=False)
    batch = data.train_rows([0, 1])
    for pos, docs in zip(batch.position_ids, batch.document_ids):
        starts = torch.cat([torch.tensor([True]), docs[1:] != docs[:-1]])
        assert torch.all(pos[starts][1:] == 0) and torch.all(pos[~starts] == pos.roll(1)[~starts] + 1)


def test_a_custom_objective_and_callbacks_plug_into_the_one_loop(gqa_model, corpus, tmp_path):
    """The trainer asks its objective for every method-specific decision: a new objective needs no
    change to the loop; callbacks see every step and can stop the run (a time budget) at a checkpoint."""
    from dmc.train.objectives import LMObjective

    class LogitNorm(LMObjective):
        label = "custom"

        def __init__(self, cfg):
            super().__init__(cfg)
            self.stage_ends = []

        def loss(self, model, batch, mode, generator):
            loss, out, parts = super().loss(model, batch, mode, generator)
            parts["logit_norm"] = out.logits.detach().float().pow(2).mean()
            return loss, out, parts

        def step_sums(self, out, mode):
            return {"rows": torch.tensor(float(out.logits.shape[0]), dtype=torch.float64)}

        def step_values(self, mode, sums, seq_len):
            return {"rows_seen": float(sums["rows"])}

        def on_stage_end(self, model, stage):
            self.stage_ends.append(stage)

    def budget(trainer, step, values):  # stands for a time budget running out after step 3
        seen.append((step, values["stage"]))
        trainer.stop_requested = step >= 3

    seen = []
    cfg = _config(gqa_model, tmp_path / "custom", corpus, tmp_path / "tok", grad_accum=2)
    objective = LogitNorm(cfg)
    trainer = Retrofitter(cfg, objective=objective, callbacks=[budget])
    assert trainer.objective is objective
    assert trainer.run() is None  # stopped early, like --max-steps
    assert seen == [(1, "zero-out"), (2, "zero-out"), (3, "retrofit")]
    assert objective.stage_ends == ["zero-out"]
    records = _records(tmp_path / "custom")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rows_seen"] == 8.0 and r["logit_norm"] > 0 for r in records)  # 2 micro-steps of 4 rows
    assert (tmp_path / "custom" / "run" / "checkpoints" / "step_00000003").is_dir()  # resumable where it stopped
