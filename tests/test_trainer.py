"""The retrofit trainer (dmc.train.Retrofitter): schedules, end to end, kill-and-resume, FSDP2, errors,
and the same loop with ``method="plain"`` (GQA up-training, custom objectives and callbacks)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest
import torch
import transformers

import dmc
from dmc.cli.main import main as cli
from dmc.tiny import pretrain, write_tiny_model_dir
from dmc.train import ConfigError, Retrofitter, TrainConfig
from dmc.train.data import PackedData
from dmc.train.trainer import StagePosition, learning_rate, locate

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
CORPUS = [str(STDLIB / "json"), str(STDLIB / "email")]  # real text every machine has
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, token_cache):
    """A 2-layer Llama with its own BPE tokenizer, pretrained for 300 steps on stdlib source, so
    that its LM loss resists merging as a real model's does."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    texts = [p.read_text() for d in CORPUS for p in sorted(pathlib.Path(d).glob("*.py"))]
    write_tiny_model_dir(path, texts, vocab_size=384)
    losses = pretrain(path, CORPUS, steps=300, token_cache=token_cache)
    assert losses[-1] < losses[0] - 1.5  # it learned something
    return path


def _config(model, out, token_cache, **kw) -> TrainConfig:
    values = dict(model=str(model), data=CORPUS, out=str(out), target_cr=2.0, seq_len=128, micro_batch_size=4,
                  lr=3e-3, zero_out_steps=10, retrofit_steps=100, finetune_steps=60, eval_every=20,
                  token_cache=token_cache, progress=False, tensorboard=False)
    values.update(kw)
    return TrainConfig(**values)


# ------------------------------------------------------------------------------ schedules
def test_stage_plan_and_learning_rate():
    cfg = TrainConfig(target_cr=4.0, zero_out_steps=10, steps_per_cr=100, finetune_steps=50, lr=1.0, min_lr=0.1,
                      warmup_steps=5, preset="paper")
    assert cfg.stage_steps() == [("zero-out", 10), ("retrofit", 300), ("finetune", 50)]
    assert locate(cfg.stage_steps(), 0) == StagePosition("zero-out", 0, 10)
    assert locate(cfg.stage_steps(), 10) == StagePosition("retrofit", 0, 300)
    assert locate(cfg.stage_steps(), 359) == StagePosition("finetune", 49, 50)
    assert learning_rate(cfg, StagePosition("retrofit", 0, 300)) == pytest.approx(0.2)  # warmup
    assert learning_rate(cfg, StagePosition("retrofit", 200, 300)) == 1.0  # constant
    assert learning_rate(cfg, StagePosition("finetune", 5, 50)) == pytest.approx(1.0)  # cosine start
    assert learning_rate(cfg, StagePosition("finetune", 49, 50)) == pytest.approx(0.1)  # cosine end


# ------------------------------------------------------------------------------ token cache
def test_corpus_is_tokenized_once(tiny_model, tmp_path, monkeypatch):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    first = PackedData.from_sources(CORPUS, tokenizer, 64, 0.01, 0, cache_dir=str(tmp_path), progress=False)
    calls = []
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: calls.append(1))
    second = PackedData.from_sources(CORPUS, tokenizer, 64, 0.01, 0, cache_dir=str(tmp_path), progress=False)
    assert not calls and isinstance(second.shards[0].tokens, np.memmap)
    assert torch.equal(first.train_rows([3, 4]).input_ids, second.train_rows([3, 4]).input_ids)


# ------------------------------------------------------------------------------ end to end
def test_retrofit_reaches_target_cr(tiny_model, tmp_path, token_cache):
    out = tmp_path / "dmc2x"
    cfg = _config(tiny_model, out, token_cache, tensorboard=True)
    assert Retrofitter(cfg).run() == out
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 186))  # + the hard stage: a quarter of the fine-tune
    assert {r["stage"] for r in records} == {"zero-out", "retrofit", "finetune", "hard"}
    for key in ("lm_loss", "cr_loss", "distill_loss", "cr_weight", "noise_scale", "target_cr", "achieved_cr",
                "per_layer_cr", "lr", "tokens_per_s"):
        assert key in records[-1]
    # diagnostics of every evaluation: per-head realized CR, its histogram, logit statistics, the gap
    last = records[-1]
    assert len(last["head_cr"]) == 2 * 2 and sum(last["head_cr_hist"].values()) == 4
    assert len(last["logit_mean"]) == 4 and 0 <= last["logit_near_threshold"] <= 1
    assert last["relaxation_gap"] == pytest.approx(last["val_loss"] - last["val_loss_relaxed"])
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["val_cr"] == last["val_cr"] and summary["head_cr_hist"] == last["head_cr_hist"]
    assert records[-1]["val_cr"] == pytest.approx(2.0, rel=0.10)  # held-out, hard decisions
    # the same batches in training mode (relaxed decisions): a loss near the hard one, not equal to it
    hard, relaxed = records[-1]["val_loss"], records[-1]["val_loss_relaxed"]
    assert relaxed != hard and abs(relaxed - hard) < 0.5 * hard
    assert any((out / "run" / "tensorboard").iterdir())
    # the written model is a DMC model that compresses held-out text at the target
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dmc_config.target_cr == 2.0
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = (STDLIB / "json" / "decoder.py").read_text()[:3000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert dmc.CompressionStats.from_cache(cache).overall_cr == pytest.approx(2.0, rel=0.15)


def test_zero_out_stage_alone_zeroes_the_decision_rows(tiny_model, tmp_path, token_cache):
    out = tmp_path / "zeroed"
    Retrofitter(_config(tiny_model, out, token_cache, stages=["zero-out"], zero_out_steps=6)).run()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj):
            assert torch.all(proj.weight.view(-1, attn.head_dim, proj.weight.shape[-1])[:, -1] == 0)
    ids = torch.randint(3, 300, (2, 64))
    with torch.no_grad():
        assert float(model.eval()(ids, use_cache=False).decisions.sum()) == 0  # α ≈ σ(-5): no merges yet
    # the later stages run alone on that DMC model
    final = tmp_path / "later"
    Retrofitter(_config(out, final, token_cache, stages=["retrofit", "finetune"], retrofit_steps=4,
                        finetune_steps=2)).run()
    records = [json.loads(line) for line in (final / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["retrofit"] * 4 + ["finetune"] * 2
    assert transformers.AutoModelForCausalLM.from_pretrained(final).dmc_config.target_cr == 2.0


_RUN_SCRIPT = """
import sys, json
from dmc.train import TrainConfig, Retrofitter
cfg = TrainConfig(**json.loads(sys.argv[1]))
Retrofitter(cfg).run()
"""


def _run_subprocess(values: dict, nproc: int = 1, kill_after_checkpoint: bool = False) -> subprocess.CompletedProcess | None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "-c", _RUN_SCRIPT, json.dumps(values)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--no-python",
               sys.executable, "-c", _RUN_SCRIPT, json.dumps(values)]
    else:
        cmd = [sys.executable, "-c", _RUN_SCRIPT, json.dumps(values)]
    if not kill_after_checkpoint:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = pathlib.Path(values["out"]) / "run" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the next steps, maybe mid-checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None


def _deterministic(records):
    keep = ("step", "stage", "lm_loss", "cr_loss", "target_cr", "achieved_cr", "per_layer_cr", "lr", "grad_norm",
            "val_loss", "val_cr", "val_loss_relaxed")
    return [{k: r[k] for k in keep if k in r} for r in records]


def test_kill_and_resume_equals_uninterrupted_run(tiny_model, tmp_path, token_cache):
    base = _config(tiny_model, tmp_path / "x", token_cache, zero_out_steps=4, retrofit_steps=40, finetune_steps=16,
                   save_every=4, eval_every=10).to_dict()
    straight = {**base, "out": str(tmp_path / "straight")}
    result = _run_subprocess(straight)
    assert result.returncode == 0, result.stderr[-2000:]
    killed = {**base, "out": str(tmp_path / "killed")}
    _run_subprocess(killed, kill_after_checkpoint=True)
    assert not (tmp_path / "killed" / "config.json").exists()  # never a half-written model
    result = _run_subprocess({**killed, "resume": True})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from step_" in result.stdout
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "killed")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "run" / "metrics.jsonl").read_text().splitlines()]
    assert _deterministic(read("straight")) == _deterministic(read("killed"))


def test_fsdp2_two_processes_on_cpu(tiny_model, tmp_path, token_cache):
    values = _config(tiny_model, tmp_path / "fsdp", token_cache, micro_batch_size=2, zero_out_steps=3,
                     retrofit_steps=6, finetune_steps=3, save_every=5, eval_every=6).to_dict()
    result = _run_subprocess({**values, "max_steps": 7}, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run_subprocess({**values, "resume": True}, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step_00000007" in result.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")
    assert type(model).__name__ == "DMCLlamaForCausalLM"
    records = [json.loads(x) for x in (tmp_path / "fsdp" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))


# ------------------------------------------------------------------------------ errors
def test_clear_errors(tiny_model, tmp_path, token_cache):
    def error(**kw):
        with pytest.raises(ConfigError) as info:
            Retrofitter(_config(kw.pop("model", tiny_model), kw.pop("out", tmp_path / "e"), token_cache, **kw))
        return str(info.value)

    assert "does not exist" in error(data=[str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    assert "no non-empty files" in error(data=[str(tmp_path / "empty")], out=str(tmp_path / "e1"))
    assert "target CR must be >= 1" in error(target_cr=0.5, out=str(tmp_path / "e2"))
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(gpt2)
    assert "DMC supports LlamaForCausalLM" in error(model=str(gpt2), out=str(tmp_path / "e3"))
    assert "not a Hugging Face model directory" in error(model=str(tmp_path), out=str(tmp_path / "e4"))
    # an output directory holding a different run
    Retrofitter(_config(tiny_model, tmp_path / "run1", token_cache, max_steps=1)).run()
    # (the default merge_delay follows the target CR, so it differs too)
    assert "holds a different run (settings differ: merge_delay, target_cr)" in error(out=str(tmp_path / "run1"),
                                                                                     target_cr=3.0)
    assert "holds a different run (settings differ: lr)" in error(out=str(tmp_path / "run1"), lr=1e-2)
    assert "pass --resume" in error(out=str(tmp_path / "run1"))
    assert "nothing to resume" in error(out=str(tmp_path / "fresh"), resume=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    assert "not a dmc run directory" in error(out=str(tmp_path / "junk"))


def test_cli_with_config_file_and_errors(tiny_model, tmp_path, token_cache, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {json.dumps(CORPUS)}\ntarget_cr: 2.0\nseq_len: 64\nzero_out_steps: 2\n"
                      f"retrofit_steps: 3\nfinetune_steps: 2\ntoken_cache: {token_cache}\ntensorboard: false\n")
    out = tmp_path / "cli"
    assert cli(["retrofit", str(tiny_model), "--config", str(config), "--out", str(out), "--no-progress",
                "--lr", "1e-3"]) == 0
    assert (out / "config.json").exists()
    assert json.loads((out / "run" / "run.json").read_text())["lr"] == 1e-3  # the flag wins over the file
    capsys.readouterr()
    assert cli(["retrofit", str(tiny_model), "--config", str(config), "--out", str(tmp_path / "c2"),
                "--target-cr", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: target CR must be >= 1")


def test_compiled_layers_share_one_graph_per_mode():
    """Compiled DMC training must not specialise on layer_idx (one graph per layer would pass
    torch's recompile limit on 8+ layers and silently fall back to eager, unfused attention)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from dmc.hf import compile_decoder_layers
    from dmc.tiny import tiny_llama

    torch._dynamo.reset()
    counters.clear()
    model = dmc.convert(tiny_llama(128, hidden=32, layers=6, heads=2, kv_heads=2))
    model.train()
    compile_decoder_layers(model, backend="eager")
    ids = torch.randint(3, 128, (2, 16))
    for vanilla in (True, False, False):
        model.set_dmc_mode(vanilla=vanilla)
        model(ids, labels=ids).loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert 0 < graphs <= 3, f"{graphs} graphs for 6 layers x 2 modes: layers compile separately"

# ------------------------------------------------------------------------------ method=plain: GQA up-training
# `dmc gqa` mean-pools K/V heads, then `dmc retrofit --method plain` continues training the stock model on
# the LM loss alone, with the DMC run's plan and machinery (spec §8).
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


def _plain_config(model, out, corpus, token_cache, **kw) -> TrainConfig:
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
    Retrofitter(_plain_config(gqa_model, straight, corpus, tmp_path / "tok", **plan)).run()
    stopped = tmp_path / "stopped"
    assert Retrofitter(_plain_config(gqa_model, stopped, corpus, tmp_path / "tok", max_steps=3, **plan)).run() is None
    assert not (stopped / "config.json").exists()
    with pytest.raises(ConfigError, match="different run .*method"):  # a DMC run cannot pick it up
        Retrofitter(_plain_config(gqa_model, stopped, corpus, tmp_path / "tok", method="dmc", resume=True, **plan))
    assert Retrofitter(_plain_config(gqa_model, stopped, corpus, tmp_path / "tok", resume=True, **plan)).run() == stopped
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
        Retrofitter(_plain_config(dmc_dir, tmp_path / "e1", corpus, tmp_path / "tok"))
    with pytest.raises(ConfigError, match="unknown method 'gqa'"):
        Retrofitter(_plain_config(gqa_model, tmp_path / "e2", corpus, tmp_path / "tok", method="gqa"))


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
    cfg = _plain_config(gqa_model, tmp_path / "custom", corpus, tmp_path / "tok", grad_accum=2)
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
