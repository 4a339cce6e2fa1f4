"""``dmc generate``: generate from a local model with the engine."""

from __future__ import annotations

import argparse
import json
import sys

from ._engine_args import add_engine_arguments, engine_kwargs

NAME = "generate"
HELP = "generate text with the DMC inference engine (paged per-head cache); prints each completion and its CR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompt-file", help="one prompt per line, or .jsonl with a 'prompt' field; - = stdin")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        handle = sys.stdin if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8")
        with handle:
            for line in handle:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                prompts.append(json.loads(line)["prompt"] if args.prompt_file.endswith(".jsonl") else line)
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    return prompts


def run(args: argparse.Namespace) -> int:
    from ..engine import LLM, SamplingParams

    try:
        prompts = _read_prompts(args)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
        params.validate()
        llm = LLM(args.model, progress=not args.stream and not args.json, **engine_kwargs(args))
    except (ValueError, MemoryError, OSError) as exc:
        print(f"dmc generate: {exc}", file=sys.stderr)
        return 2
    if llm.tokenizer is None:
        print("dmc generate: the model directory has no tokenizer; use the Python API with token ids",
              file=sys.stderr)
        return 2
    if args.stream:
        if len(prompts) != 1:
            print("dmc generate: --stream takes one prompt", file=sys.stderr)
            return 2
        for update in llm.stream(prompts, params):
            sys.stdout.write(update.new_text)
            sys.stdout.flush()
            if update.finished:
                print(f"\n[{update.finish_reason}; {_cr(update)}]")
        return 0
    failed = 0
    for out in llm.generate(prompts, params):
        failed += out.error is not None
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason, "error": out.error,
                              "compression": out.compression}))
        elif out.error:
            print(f"--- prompt {out.request_id}: error: {out.error}")
        else:
            print(f"--- prompt {out.request_id} [{out.finish_reason}; {_cr(out)}]\n{out.prompt}{out.text}")
    return 1 if failed else 0


def _cr(out) -> str:
    if not out.compression:
        return "no cache"
    c = out.compression
    return f"CR {c['cr']:.2f} ({c['tokens']} tokens, {c['slots']} slots over all layers and heads)"
