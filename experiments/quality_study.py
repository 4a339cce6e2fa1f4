"""The from-scratch quality study: a small Llama pretrained on the
Python sources of this machine, then ``dmc study`` on it.

A Llama-style model (~31M parameters) is pretrained from scratch on the standard library and
site-packages (a few stdlib packages are held out whole); then :mod:`dmc.study` compares DMC at
2x/4x/8x with plain continued training on the same tokens, GQA up-training, H2O and TOVA, every
model evaluated on the held-out packages. Every number in the written report comes from this run.

Each step is skipped when its output exists in ``--work``, and an interrupted training resumes from
its last checkpoint, so the same command continues an interrupted run (e.g. after a time limit):

    corpus     held-out packages and a deterministic sample of all other sources, as JSONL
    tokenizer  byte-level BPE trained on a sample; a randomly initialised Llama beside it
    pretrain   dmc.train.Retrofitter, method="plain": warmup, then the constant peak lr (the stable
               phase of warmup-stable-decay: the final pretraining lr is the retrofit lr, spec §5)
    study      dmc.study on the pretrained model: every continued run (DMC at each CR, plain, GQA)
               follows one plan, --extra-fraction of the pretraining tokens; H2O and TOVA evict on
               the plain continued model (--evict-base plain: a model trained from scratch still
               improves with extra tokens, so eviction is judged on the model with the same tokens)
    report     OUT/results/quality/: the study's results.json/results.md/plots, with this run's
               setup (corpus, pretraining) and the goals judged

    python experiments/quality_study.py --work /tmp/qs --out docs
    python experiments/quality_study.py --smoke --work /tmp/qs-smoke --out /tmp/qs-docs   # CPU, a minute or two
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shlex
import shutil
import site
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass

import torch

PROCESS_START = time.time()


# ==================================================================================== settings
@dataclass
class Settings:
    """Every size of the study. ``FULL`` is sized for one H100/H200; ``SMOKE`` shrinks everything
    so the whole pipeline runs on a 2-core CPU in a minute or two."""

    # data
    corpus_mb: float = 500.0  # training text, sampled deterministically from the Python sources found
    tokenizer_sample_mb: float = 24.0
    vocab_size: int = 8192
    held_out: tuple[str, ...] = ("asyncio", "unittest", "email")  # stdlib packages held out whole
    shards: int = 32  # training JSONL files
    # model: Llama, MHA so that GQA can pool 2x, 4x and 8x
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 8
    intermediate: int = 1536
    seq_len: int = 1024
    # pretraining: warmup, then constant (measured on the demo model, 300 steps to CR 8: a small
    # model's decisions barely move at a tenth of the peak lr, so the retrofit lr stays high)
    pretrain_steps: int = 3000
    rows_per_step: int = 64
    micro_batch: int = 32
    lr: float = 3e-3
    warmup_steps: int = 200
    weight_decay: float = 0.1
    # continued training: DMC, plain and GQA share one plan (the study gives them the same tokens)
    extra_fraction: float = 0.10  # of the pretraining tokens, per run
    extra_lr: float | None = None  # None: the final pretraining lr
    extra_min_lr_ratio: float = 0.1  # end of the fine-tune cosine, relative to the extra lr
    extra_rows_per_step: int = 32  # half of pretraining's: twice the steps for the same tokens
    zero_out_share: float = 0.08
    finetune_share: float = 0.25
    val_fraction: float = 0.002
    crs: tuple[float, ...] = (2, 4, 8)
    # evaluation (every model sees the same held-out windows)
    eval_windows: int = 128
    eval_batch: int = 16
    # runtime (may change between invocations)
    compile: bool = True  # pretraining only (DMC's training layers compiled for ~5 min on the H100)

    RUNTIME = ("compile", "crs")

    def identity(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}


FULL = Settings()
SMOKE = Settings(corpus_mb=1.0, tokenizer_sample_mb=0.3, vocab_size=512, shards=2, hidden=64, layers=2, heads=4,
                 kv_heads=4, intermediate=128, seq_len=128, pretrain_steps=40, rows_per_step=8, micro_batch=8,
                 warmup_steps=5, extra_fraction=0.5, extra_rows_per_step=8, val_fraction=0.05, eval_windows=4,
                 eval_batch=4, compile=False)


class Work:
    """Paths under --work."""

    def __init__(self, root: pathlib.Path, out: pathlib.Path) -> None:
        self.root, self.out = root, out
        self.data = root / "data"
        self.train_dir = self.data / "train"
        self.heldout_file = self.data / "heldout" / "heldout.jsonl"
        self.tokens = root / "tokens"
        self.init = root / "init"
        self.base = root / "base"
        self.study = root / "study"

    def read(self, name: str) -> dict | None:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def write(self, name: str, value: dict) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, path)


def log(message: str) -> None:
    print(f"[{time.time() - PROCESS_START:7.1f}s] {message}", flush=True)


# ==================================================================================== data
def python_roots() -> list[tuple[str, pathlib.Path]]:
    """The stdlib and the site-packages directories of this interpreter."""
    roots = [("stdlib", pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve())]
    for path in site.getsitepackages():
        path = pathlib.Path(path).resolve()
        if path.is_dir() and all(path != r for _, r in roots):
            roots.append(("site-packages", path))
    return roots


def _python_files(root: pathlib.Path) -> list[pathlib.Path]:
    """*.py files under ``root`` (256 B to 512 KB: no stubs, no generated tables), skipping nested
    site-packages (walked as their own root), caches and hidden directories."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in
                         ("site-packages", "dist-packages", "__pycache__"))
        for name in files:
            if name.endswith(".py"):
                path = pathlib.Path(directory) / name
                with contextlib.suppress(OSError):
                    if 256 <= path.stat().st_size <= 512 * 1024:
                        found.append(path)
    return found


def _read_source(path: pathlib.Path) -> str | None:
    text = path.read_bytes().decode("utf-8", errors="replace")
    if "\x00" in text or text.count("\ufffd") > len(text) // 100:
        return None
    return text


def _sort_key(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


def collect_corpus(s: Settings, work: Work) -> dict:
    """Write the held-out packages and a deterministic sample of all other Python sources as JSONL.

    Held out: the stdlib packages ``s.held_out`` whole. Kept out of training too: their test
    packages (``test/test_<name>``), vendored copies (any directory named like them) and any file
    whose content equals a held-out file. Training files are taken in an order fixed by a hash of
    their path inside their root, until ``s.corpus_mb``; duplicates are dropped.
    """
    done = work.read("data/corpus.json")
    if done:
        return done
    started = time.time()
    held, train, seen = [], [], set()
    candidates, excluded, duplicates = 0, 0, 0
    blocked = set(s.held_out) | {f"test_{name}" for name in s.held_out}
    by_root = [(kind, root, _python_files(root)) for kind, root in python_roots()]
    for kind, root, files in by_root:  # held-out first, so its copies elsewhere are dropped
        for path in sorted(files):
            rel = path.relative_to(root)
            if kind == "stdlib" and rel.parts[0] in s.held_out:
                text = _read_source(path)
                if text and _sort_key(text) not in seen:
                    seen.add(_sort_key(text))
                    held.append({"text": text, "path": f"{kind}/{rel}"})
    order = []
    for kind, root, files in by_root:
        for path in files:
            rel = path.relative_to(root)
            candidates += 1
            if any(part in blocked for part in rel.parts[:-1]):
                excluded += 1
                continue
            order.append((_sort_key(f"{kind}/{rel}"), kind, rel, path))
    order.sort()
    budget, used = s.corpus_mb * 2**20, 0
    for _, kind, rel, path in order:
        if used >= budget:
            break
        text = _read_source(path)
        if not text:
            continue
        key = _sort_key(text)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        train.append({"text": text, "path": f"{kind}/{rel}"})
        used += len(text.encode())
    if not held:
        raise SystemExit(f"none of the held-out packages {s.held_out} found in the stdlib "
                         f"({sysconfig.get_paths()['stdlib']})")
    _write_jsonl(work.heldout_file, held)
    work.train_dir.mkdir(parents=True, exist_ok=True)
    for i in range(s.shards):
        _write_jsonl(work.train_dir / f"shard-{i:03d}.jsonl", train[i::s.shards])
    packages = Counter()
    for doc in train:
        kind, first = doc["path"].split("/")[:2]
        packages[first if kind == "site-packages" else "stdlib"] += len(doc["text"].encode())
    info = {
        "roots": [f"{kind}: {root}" for kind, root, _ in by_root],
        "python": sys.version.split()[0],
        "held_out_packages": [f"stdlib/{name}" for name in s.held_out],
        "held_out_files": len(held), "held_out_bytes": sum(len(d["text"].encode()) for d in held),
        "train_files": len(train), "train_bytes": used,
        "candidate_files": candidates, "excluded_as_held_out_copies": excluded, "duplicates_dropped": duplicates,
        "largest_sources_mb": {k: round(v / 2**20, 1) for k, v in packages.most_common(12)},
        "seconds": round(time.time() - started, 1),
    }
    work.write("data/corpus.json", info)
    log(f"corpus: {info['train_files']} training files ({used / 2**20:.0f} MB) of {candidates} found; held out "
        f"{', '.join(s.held_out)}: {len(held)} files ({info['held_out_bytes'] / 2**20:.1f} MB)")
    return info


def _write_jsonl(path: pathlib.Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in docs)


def read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_init_model(s: Settings, work: Work) -> None:
    """A byte-level BPE tokenizer trained on a sample of the training text, and a randomly
    initialised Llama beside it (work/init)."""
    if (work.init / "config.json").exists():
        return
    import transformers

    from dmc.tiny import train_tokenizer
    started = time.time()
    quota = s.tokenizer_sample_mb * 2**20 / s.shards  # the same share of every shard
    sample = []
    for shard in sorted(work.train_dir.glob("*.jsonl")):
        size = 0
        for doc in read_jsonl(shard):
            if size >= quota:
                break
            sample.append(doc["text"])
            size += len(doc["text"].encode())
    tokenizer = train_tokenizer(sample, vocab_size=s.vocab_size)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.seq_len, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(work.init)
    tokenizer.save_pretrained(work.init)
    log(f"tokenizer: {len(tokenizer)} tokens from {sum(map(len, sample)) / 2**20:.1f} MB of text; model: "
        f"{count_parameters(model) / 1e6:.1f}M parameters ({time.time() - started:.0f} s)")


def count_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ==================================================================================== pretraining
def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def pretrain(s: Settings, work: Work) -> dict:
    """Next-token pretraining from scratch with the project's trainer (method="plain", one stage
    of warmup then constant lr, decoder layers compiled on GPU); resumes an interrupted run."""
    done = work.read("base/pretrain.json")
    if done:
        return done
    from dmc.train import Retrofitter, TrainConfig
    resume = (work.base / "run" / "run.json").exists()
    cuda = torch.cuda.is_available()
    cfg = TrainConfig(
        model=str(work.init), data=[str(work.train_dir)], out=str(work.base), method="plain", stages=["retrofit"],
        retrofit_steps=s.pretrain_steps, warmup_steps=s.warmup_steps, lr=s.lr, weight_decay=s.weight_decay,
        seq_len=s.seq_len, micro_batch_size=s.micro_batch, grad_accum=max(1, s.rows_per_step // s.micro_batch),
        val_fraction=0.0, token_cache=str(work.tokens), compile=s.compile and cuda, eval_every=s.pretrain_steps + 1,
        save_every=max(50, s.pretrain_steps // 10), keep_checkpoints=1, tensorboard=False, progress=sys.stderr.isatty(),
        resume=resume)
    tokens = s.pretrain_steps * s.rows_per_step * s.seq_len
    log(f"{'resuming' if resume else 'starting'} pretraining: {s.pretrain_steps} steps of {s.rows_per_step} rows × "
        f"{s.seq_len} tokens = {tokens / 1e6:.1f}M tokens, lr {s.lr:g} after {s.warmup_steps} warmup steps")
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's note that there is no validation split
        trainer = Retrofitter(cfg)
    from dmc.study.runner import _print_progress
    if not cfg.progress:
        _print_progress(trainer)
    trainer.run()
    epochs = s.pretrain_steps * s.rows_per_step / trainer.data.rows_per_epoch
    del trainer
    records = [json.loads(line) for line in (work.base / "run" / "metrics.jsonl").read_text().splitlines() if line]
    seconds = sum(s.rows_per_step * s.seq_len / r["tokens_per_s"] for r in records)
    info = {"steps": s.pretrain_steps, "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds), "epochs": round(epochs, 3), "peak_lr": s.lr, "final_lr": s.lr,
            "warmup_steps": s.warmup_steps, "final_train_loss": round(records[-1]["lm_loss"], 4),
            "losses": [[r["step"], round(r["lm_loss"], 4)] for r in records[::max(1, len(records) // 100)]],
            "parameters": count_parameters_of(work.base), "device": device_name()}
    shutil.rmtree(work.base / "run" / "checkpoints", ignore_errors=True)
    work.write("base/pretrain.json", info)
    log(f"pretrained {info['steps']} steps, {tokens / 1e6:.0f}M tokens in {seconds / 60:.1f} min "
        f"({info['tokens_per_s']:,} tokens/s), final loss {info['final_train_loss']}")
    return info


def count_parameters_of(path: pathlib.Path) -> int:
    import transformers
    return count_parameters(transformers.AutoModelForCausalLM.from_pretrained(path))


# ==================================================================================== the study
def extra_recipe(s: Settings, pretrain_info: dict) -> dict:
    """The TrainConfig settings every continued run shares: ``s.extra_fraction`` of the
    pretraining tokens, split into zero-out / retrofit (CR ramped) / fine-tune, at the final
    pretraining lr. The recipe's levers (and any extra stage) keep TrainConfig's defaults unless
    --set/--recipe change them."""
    tokens_per_step = s.extra_rows_per_step * s.seq_len
    steps = max(3, int(s.extra_fraction * pretrain_info["tokens"]) // tokens_per_step)
    zero = max(1, round(s.zero_out_share * steps))
    finetune = max(1, round(s.finetune_share * steps))
    lr = s.extra_lr or pretrain_info["final_lr"]
    return {"zero_out_steps": zero, "retrofit_steps": steps - zero - finetune, "finetune_steps": finetune,
            "lr": lr, "min_lr": lr * s.extra_min_lr_ratio, "weight_decay": s.weight_decay, "seq_len": s.seq_len,
            "micro_batch_size": min(s.micro_batch, s.extra_rows_per_step),
            "grad_accum": max(1, s.extra_rows_per_step // s.micro_batch), "val_fraction": s.val_fraction, "seed": 1,
            # Not compiled: on the H100 (torch 2.11) compiling DMC's training layers took ~5 minutes
            "compile": False, "eval_every": steps, "eval_batches": 4, "save_every": max(10, steps // 4),
            "keep_checkpoints": 1, "tensorboard": False}


def study_settings(s: Settings, work: Work, args) -> "StudySettings":
    from dmc.study import StudySettings, load_recipe, parse_assignments
    recipe = {**extra_recipe(s, work.read("base/pretrain.json")), "token_cache": str(work.tokens),
              **load_recipe(args.recipe), **parse_assignments(args.set)}
    return StudySettings(model=str(work.base), data=[str(work.train_dir)], heldout=[str(work.heldout_file)],
                         out=str(work.study), crs=list(s.crs), methods=args.methods or ["dmc", "plain", "gqa", "h2o",
                                                                                        "tova"],
                         train=recipe, eval_seq_len=s.seq_len, eval_windows=s.eval_windows,
                         eval_batch_size=s.eval_batch, evict_base="plain")


# ==================================================================================== report
TOLERANCE = 0.05  # realized CR within ±5% of the target


def goals(rows: list[dict]) -> list[dict]:
    """The targets, judged from the study's rows: DMC 4x within +3% perplexity of plain continued
    training on the same tokens and at most GQA 4x (the from-scratch target); DMC below H2O
    and TOVA (budgets matched to its realized CR) at 4x and 8x, and below GQA 8x. A DMC model whose
    realized CR is off its target by more than 5% fails them."""
    find = {(r["method"], r["target_cr"], r.get("budget_kind")): r for r in rows}
    plain = next((r for r in rows if r["method"] == "plain"), None)
    out = []

    def add(goal: str, ok: bool | None, detail: str) -> None:
        out.append({"goal": goal, "status": "missing" if ok is None else ("pass" if ok else "fail"), "detail": detail})

    def on_target(row: dict) -> tuple[bool, str]:
        ok = abs(row["realized_cr"] / row["target_cr"] - 1) <= TOLERANCE
        return ok, f"realized CR {row['realized_cr']:.2f}" + ("" if ok else f" (off the target by more than "
                                                                              f"{TOLERANCE:.0%})")

    dmc4 = find.get(("dmc", 4, None))
    if dmc4 and plain:
        gap = dmc4["perplexity"] / plain["perplexity"] - 1
        ok, cr = on_target(dmc4)
        add("DMC 4x within +3% perplexity of plain continued training", ok and gap <= 0.03,
            f"{dmc4['perplexity']:.3f} vs {plain['perplexity']:.3f} ({gap:+.1%}); {cr}")
    else:
        add("DMC 4x within +3% perplexity of plain continued training", None, "rows missing")
    for cr, others, goal in ((4, ("gqa",), "DMC 4x at most GQA 4x (up-trained)"),
                             (4, ("h2o", "tova"), "DMC 4x below H2O and TOVA at 4x"),
                             (8, ("gqa", "h2o", "tova"), "DMC 8x below GQA, H2O and TOVA at 8x")):
        mine = find.get(("dmc", cr, None))
        theirs = [find.get((m, cr, "matched" if m in ("h2o", "tova") else None)) for m in others]
        if not mine or None in theirs[-2:] or not any(theirs):  # GQA may be skipped (KV heads)
            add(goal, None, "rows missing")
            continue
        theirs = [r for r in theirs if r]
        ok, realized = on_target(mine)
        better = all(mine["perplexity"] <= r["perplexity"] if r["method"] == "gqa" and cr == 4 else
                     mine["perplexity"] < r["perplexity"] for r in theirs)
        add(goal, ok and better, f"DMC {mine['perplexity']:.3f} vs " + ", ".join(
            f"{r['method'].upper()} {r['perplexity']:.3f}" for r in theirs) + f"; DMC {realized}")
    return out


def write_report(s: Settings, work: Work, result: dict | None = None) -> pathlib.Path:
    """OUT/results/quality/: the study's report (``result``, or rebuilt from --work) with this
    run's setup and the goals."""
    from dmc.study import report
    result = result or report(work.study)
    target = work.out / "results" / "quality"
    target.mkdir(parents=True, exist_ok=True)
    for f in work.study.glob("*.png"):
        shutil.copy(f, target / f.name)
    judged = goals(result["rows"])
    corpus, pre = work.read("data/corpus.json") or {}, work.read("base/pretrain.json") or {}
    result["meta"]["from_scratch"] = {"corpus": corpus, "pretraining": {k: v for k, v in pre.items()},
                                      "settings": dataclasses.asdict(s)}
    result["goals"] = judged
    (target / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["# Quality study from scratch: DMC vs plain continued training, GQA, H2O and TOVA", "",
             "Written by `experiments/quality_study.py` (how to run it: `experiments/quality_study.md`) on top of "
             "`dmc study`; every number comes from that run. Raw numbers: `results.json`.", "",
             "## Goals", "", "| goal | status | numbers |", "|---|---|---|"]
    lines += [f"| {g['goal']} | **{g['status']}** | {g['detail']} |" for g in judged]
    lines += ["", "## Setup", ""]
    if corpus:
        lines.append(f"- **Data**: Python sources of this machine (Python {corpus['python']}: the standard library "
                     f"and site-packages): {corpus['train_files']} training files, "
                     f"{corpus['train_bytes'] / 2**20:.0f} MB. Held out whole: {', '.join(corpus['held_out_packages'])} "
                     f"({corpus['held_out_files']} files); their tests, vendored copies and identical files are kept "
                     "out of training.")
    if pre:
        lines.append(f"- **Pretraining**: {pre.get('parameters', 0) / 1e6:.1f}M parameters ({s.layers} layers, hidden "
                     f"{s.hidden}, {s.heads} heads, {s.kv_heads} KV heads, vocabulary {s.vocab_size}), {pre['steps']} "
                     f"steps, {pre['tokens'] / 1e6:.1f}M tokens ({pre['epochs']} epochs) in {pre['seconds'] / 60:.1f} "
                     f"min at {pre['tokens_per_s']:,} tokens/s on {pre['device']}; lr {pre['peak_lr']:g} after "
                     f"{pre['warmup_steps']} warmup steps, then constant (the continued runs' fine-tune is the decay).")
    trained = next((r for r in result["rows"] if r.get("train")), None)
    if trained:
        recipe = result["meta"]["settings"]["train"]
        plan = ", ".join(f"{stage} {steps}" for stage, steps in trained["train"]["plan"])
        share = f" ({trained['tokens'] / pre['tokens']:.1%} of pretraining)" if pre else ""
        lines.append(f"- **Continued training** (every DMC, plain and GQA run alike): {plan} steps, "
                     f"{trained['tokens'] / 1e6:.2f}M tokens{share}, lr {recipe['lr']:g} (the fine-tune's cosine ending "
                     f"at {recipe['min_lr']:g}); other settings: TrainConfig's defaults unless `meta.settings.train` "
                     "says otherwise. H2O and TOVA evict on the plain continued model.")
    study_md = (work.study / "results.md").read_text().split("\n", 2)[2]  # without its title
    (target / "results.md").write_text("\n".join(lines) + "\n\n## The study\n\n" + study_md)
    log(f"report → {target}")
    return target


# ==================================================================================== main
def resolve_settings(args) -> Settings:
    s = dataclasses.replace(SMOKE if args.smoke else FULL)
    overrides = {"pretrain_steps": args.pretrain_steps, "extra_fraction": args.extra_fraction,
                 "extra_lr": args.extra_lr, "corpus_mb": args.corpus_mb, "eval_windows": args.eval_windows,
                 "crs": tuple(args.crs) if args.crs else None}
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_compile:
        s.compile = False
    return s


def check_work_settings(s: Settings, work: Work) -> None:
    """A work directory holds one study: refuse settings that would mix two."""
    saved = work.read("settings.json")
    current = json.loads(json.dumps(s.identity()))
    if saved is None:
        work.write("settings.json", current)
    elif saved != current:
        changed = sorted(k for k in current if saved.get(k) != current.get(k))
        raise SystemExit(f"{work.root} holds a study with other settings ({', '.join(changed)}); "
                         "use another --work or the same flags")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="data, models, runs (outside git)")
    parser.add_argument("--out", default="docs", help="writes OUT/results/quality/")
    parser.add_argument("--smoke", action="store_true", help="tiny everything: the pipeline on a CPU")
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--extra-fraction", type=float, help="extra tokens per run, as a fraction of pretraining")
    parser.add_argument("--extra-lr", type=float, help="lr of the continued runs (default: final pretraining lr)")
    parser.add_argument("--corpus-mb", type=float)
    parser.add_argument("--eval-windows", type=int)
    parser.add_argument("--crs", type=float, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=("dmc", "plain", "gqa", "h2o", "tova"))
    parser.add_argument("--only", nargs="+", help="passed to dmc study: run only these (METHOD or METHOD@CR)")
    parser.add_argument("--recipe", help="passed to dmc study: YAML/JSON of TrainConfig settings")
    parser.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                        help="passed to dmc study: TrainConfig settings of the continued runs")
    parser.add_argument("--report-only", action="store_true", help="rebuild OUT/results/quality/ from --work")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)

    s = resolve_settings(args)
    import transformers
    transformers.utils.logging.disable_progress_bar()  # keep the log readable
    from dmc.study import StudyError, run_study
    work = Work(pathlib.Path(args.work).resolve(), pathlib.Path(args.out))
    work.root.mkdir(parents=True, exist_ok=True)
    check_work_settings(s, work)
    command = "python " + shlex.join([sys.argv[0] if argv is None else "experiments/quality_study.py",
                                      *(sys.argv[1:] if argv is None else argv)])
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: one thread is faster, and far faster on a busy machine
    try:
        result = None
        if not args.report_only:
            log(f"quality study{' (smoke)' if args.smoke else ''} on {device_name()}")
            collect_corpus(s, work)
            build_init_model(s, work)
            pretrain(s, work)
            result = run_study(study_settings(s, work, args), only=args.only, command=command)
        write_report(s, work, result)
    except StudyError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
