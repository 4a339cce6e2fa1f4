"""``make demo``: the main job end to end on a CPU in a few minutes, on text every machine has.

1. Train a byte-level BPE tokenizer and pretrain a tiny Llama on Python's standard library
   (a few packages), holding out other packages whole.
2. Retrofit it to DMC with the real trainer (zero-out → retrofit → fine-tune).
3. Train a copy of the vanilla model for as many extra steps as the retrofit took (a tiny
   model is far from converged, so extra steps alone lower perplexity: this is the fair
   baseline), then compare on the held-out packages: perplexity of vanilla (as pretrained and
   with the extra steps), of DMC in full-sequence mode and through its compressed cache; realized
   CR overall, per layer and per head; KV-cache bytes; and a greedy sample from both.

    python -m dmc.demo [--target-cr 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import shutil
import sysconfig
import tempfile
import time

import torch

TRAIN_PACKAGES = ["json", "email", "http", "urllib", "xml/dom", "importlib", "concurrent/futures", "logging"]
HELD_OUT_PACKAGES = ["unittest", "asyncio"]


def _packages(names: list[str]) -> list[str]:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    found = [str(stdlib / n) for n in names if (stdlib / n).is_dir()]
    if not found:
        raise SystemExit(f"none of {names} found under {stdlib}: this demo reads Python's standard library")
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="DMC end to end on a tiny model (CPU, a few minutes)")
    parser.add_argument("--target-cr", type=float, default=4.0)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--retrofit-steps", type=int, default=240)
    parser.add_argument("--finetune-steps", type=int, default=80)
    parser.add_argument("--workdir", default=None, help="where the models go (default: a temporary directory)")
    args = parser.parse_args(argv)

    import transformers

    from dmc.eval import perplexity
    from dmc.tiny import pretrain, write_tiny_model_dir
    from dmc.train import TrainConfig, Retrofitter

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="dmc-demo-"))
    train_data, held_out = _packages(TRAIN_PACKAGES), _packages(HELD_OUT_PACKAGES)
    started = time.time()
    print(f"dmc demo — working in {work}\n")

    print("1/4  tokenizer + tiny Llama (4 layers, hidden 128, 4 KV heads), pretrained on "
          f"{len(train_data)} stdlib packages")
    base = work / "base"
    texts = [p.read_text(errors="replace") for d in train_data for p in sorted(pathlib.Path(d).rglob("*.py"))]
    write_tiny_model_dir(base, texts, vocab_size=1024, hidden=128, layers=4, heads=4, kv_heads=4, max_positions=512)
    losses = pretrain(base, train_data, steps=args.pretrain_steps, seq_len=256, batch_size=8, lr=3e-3,
                      progress=True, token_cache=str(work / "tokens"))
    print(f"     pretraining loss {losses[0]:.2f} → {sum(losses[-20:]) / 20:.2f}\n")

    print(f"2/4  retrofit to DMC, target CR {args.target_cr:g} (zero-out → retrofit → fine-tune)")
    out = work / f"dmc-{args.target_cr:g}x"
    cfg = TrainConfig(model=str(base), data=train_data, out=str(out), target_cr=args.target_cr, seq_len=256,
                      micro_batch_size=8, lr=3e-3, min_lr=3e-4, zero_out_steps=20,
                      retrofit_steps=args.retrofit_steps, finetune_steps=args.finetune_steps, eval_every=50,
                      val_fraction=0.02, token_cache=str(work / "tokens"), tensorboard=False, overwrite=True)
    Retrofitter(cfg).run()
    print()

    extra_steps = cfg.zero_out_steps + args.retrofit_steps + args.finetune_steps
    print(f"3/4  baseline: the vanilla model trained {extra_steps} more steps, like the retrofit")
    continued = work / "base-continued"
    shutil.copytree(base, continued, dirs_exist_ok=True)
    pretrain(continued, train_data, steps=extra_steps, seq_len=256, batch_size=8, lr=3e-3, seed=1, progress=True,
             token_cache=str(work / "tokens"))
    print(f"\n4/4  held-out packages ({', '.join(HELD_OUT_PACKAGES)}), windows of 256 tokens")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    vanilla = transformers.AutoModelForCausalLM.from_pretrained(continued).eval()
    compressed = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    texts = [p.read_text(errors="replace") for d in held_out for p in sorted(pathlib.Path(d).rglob("*.py"))]
    window = dict(seq_len=256, max_windows=24)
    loss_pretrained = perplexity(pretrained, tokenizer, texts, mode="full", **window).loss
    loss_vanilla = perplexity(vanilla, tokenizer, texts, mode="full", **window).loss
    loss_full = perplexity(compressed, tokenizer, texts, mode="full", **window).loss
    cached = perplexity(compressed, tokenizer, texts, mode="cache", **window)
    loss_cache, overall = cached.loss, cached.compression
    tokens, slots = overall.tokens, overall.slots
    cfg_model = compressed.config
    bytes_per_slot = 2 * cfg_model.head_dim * 2  # k and v, bf16
    kv_vanilla = float(tokens.sum()) * bytes_per_slot
    kv_dmc = float(slots.sum()) * bytes_per_slot

    print(f"     perplexity   vanilla as pretrained {math.exp(loss_pretrained):8.2f}   "
          f"vanilla + {extra_steps} steps {math.exp(loss_vanilla):8.2f}")
    print(f"                  DMC, full sequence {math.exp(loss_full):8.2f}   "
          f"DMC, through the compressed cache {math.exp(loss_cache):8.2f}")
    print(f"     realized CR  {overall.overall_cr:.2f} (target {args.target_cr:g})")
    print("     per layer    " + "  ".join(f"L{i}: {cr:.2f}" for i, cr in enumerate(overall.per_layer_cr.tolist())))
    print("     per head     ")
    for i, row in enumerate(overall.per_head_cr.tolist()):
        print(f"       layer {i}: " + " ".join(f"{cr:5.2f}" for cr in row))
    print(f"     KV cache     {kv_vanilla / 2**20:.2f} MiB vanilla → {kv_dmc / 2**20:.2f} MiB DMC "
          f"({1 - kv_dmc / kv_vanilla:.0%} saved, bf16 k+v per head over {int(tokens[0, :, 0].sum())} tokens)")

    prompt = "def test_"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    settings = dict(max_new_tokens=60, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    for name, model in ((f"vanilla + {extra_steps} steps", vanilla), ("DMC", compressed)):
        text = tokenizer.decode(model.generate(ids, **settings)[0], skip_special_tokens=True)
        print(f"\n     --- {name} sample (greedy) ---\n{text}")
    print(f"\ndone in {time.time() - started:.0f} s; models in {work}")
    return {"loss_pretrained": loss_pretrained, "loss_vanilla": loss_vanilla, "loss_dmc_full": loss_full,
            "loss_dmc_cache": loss_cache, "cr": overall.overall_cr, "kv_bytes_vanilla": kv_vanilla,
            "kv_bytes_dmc": kv_dmc}


if __name__ == "__main__":
    main()
