"""A retrofitted real model through the engine, on a GPU:

1. fp32: the engine's greedy tokens equal Hugging Face ``generate()`` with the DMC cache;
2. bf16: the same comparison, reporting where each prompt first diverges (rounding differs between
   the paged Triton kernels and the HF path, so a near-tie can flip);
3. the engine's realized CR after prefilling held-out windows equals the full-sequence CR that
   ``dmc eval`` reports for the same tokens.

    python experiments/real_model/engine_check.py MODEL_DIR --heldout DIR... --out check.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
import transformers

import dmc
from dmc.train.data import discover_files


DEVICE = "cuda"


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts_from(paths: list[str], tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens, each from the start of a different held-out file."""
    out = []
    for path in discover_files(paths):
        ids = tokenizer(pathlib.Path(path).read_text(errors="replace")).input_ids
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == count:
            break
    return out


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         min_new_tokens=new_tokens)
    return out[0, len(prompt):].tolist()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def compare(model_dir: str, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEVICE).eval()
    reference = [hf_greedy(model, p, new_tokens) for p in prompts]
    del model
    _free()
    llm = dmc.LLM(model_dir, dtype=dtype, device=DEVICE, max_model_len=max(len(p) for p in prompts) + new_tokens + 16,
                  progress=False)
    params = dmc.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    engine = [o.token_ids for o in outputs]
    divergence = [first_divergence(e, r) for e, r in zip(engine, reference)]
    del llm
    _free()
    return {"dtype": str(dtype).removeprefix("torch."), "prompts": len(prompts), "new_tokens": new_tokens,
            "equal": sum(d is None for d in divergence), "first_divergence": divergence,
            "engine_cr": [round(o.compression["cr"], 4) for o in outputs]}


def realized_cr(model_dir: str, windows: list[list[int]]) -> dict:
    """Engine CR after prefilling each window vs the full-sequence (dmc eval) CR of the same tokens."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    with torch.no_grad():
        ids = torch.tensor(windows, device=DEVICE)
        full = model(ids, use_cache=False)
    stats = full.compression
    eval_cr = stats.per_sequence_cr.tolist()
    del model
    _free()
    llm = dmc.LLM(model_dir, dtype=torch.float32, device=DEVICE, max_model_len=len(windows[0]) + 8, progress=False)
    outputs = llm.generate(windows, dmc.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    engine = [o.compression for o in outputs]
    return {"windows": len(windows), "tokens_per_window": len(windows[0]),
            "eval_cr_overall": stats.overall_cr, "eval_cr": [round(x, 4) for x in eval_cr],
            "eval_slots": stats.slots.sum((0, 2)).tolist(), "eval_tokens": stats.tokens.sum((0, 2)).tolist(),
            "engine": [{k: v for k, v in c.items() if k != "per_layer_cr"} for c in engine]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--heldout", nargs="+", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-len", type=int, default=1024)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", help="cuda (the engine's Triton kernels) or cpu (their twins)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; pass --device cpu to run the engine's PyTorch twins", file=sys.stderr)
        return 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    prompts = prompts_from(args.heldout, tokenizer, args.prompts, args.prompt_len)
    gpu = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "cpu"
    result = {"model": args.model, "gpu": gpu, "torch": torch.__version__,
              "transformers": transformers.__version__}
    result["fp32"] = compare(args.model, prompts, args.new_tokens, torch.float32)
    print("fp32:", json.dumps(result["fp32"]), flush=True)
    result["bf16"] = compare(args.model, prompts, args.new_tokens, torch.bfloat16)
    print("bf16:", json.dumps(result["bf16"]), flush=True)
    windows = prompts_from(args.heldout[::-1], tokenizer, args.windows, args.window_len)
    result["realized_cr"] = realized_cr(args.model, windows)
    print("realized CR:", json.dumps(result["realized_cr"]), flush=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
