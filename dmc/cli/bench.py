"""``dmc bench``: decode throughput of the engine on a local model."""

from __future__ import annotations

import argparse
import json
import sys

from ._checks import check_eviction, check_weights
from ._engine_args import add_engine_arguments, add_forced_cr_argument, describe_load_error, engine_config, load_errors

NAME = "bench"
HELP = ("measure the engine's decode throughput on a local model: random prompts, greedy generation, the "
        "largest batch that fits; prints tokens/s, batch, realized CR, peak memory")
HELP_DEFAULTS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--prompt-len", type=int, default=1024, help="tokens of every random prompt")
    parser.add_argument("--gen-len", type=int, default=1024, help="tokens generated for every prompt, >= 2")
    parser.add_argument("--measure-steps", type=int, default=1024,
                        help="average over the last N decode steps (at most half of them)")
    add_forced_cr_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..engine import LLM
    from ..engine.bench import measure_throughput

    try:
        config = engine_config(args, forced_period=args.forced_cr)
        check_weights(args.model)
        check_eviction(args.model, args.eviction, args.vanilla, args.forced_cr)
        if args.prompt_len < 1 or args.gen_len < 2:
            raise ValueError("--prompt-len must be >= 1 and --gen-len >= 2")
        if args.measure_steps < 1:
            raise ValueError(f"--measure-steps must be >= 1, got {args.measure_steps}")
        if config.max_model_len is None:
            config = config.replace(max_model_len=args.prompt_len + args.gen_len)
        elif args.prompt_len + args.gen_len > config.max_model_len:
            raise ValueError(f"--prompt-len + --gen-len = {args.prompt_len + args.gen_len} tokens does not fit "
                             f"--max-model-len {config.max_model_len}: lower them or raise --max-model-len")
    except ValueError as exc:
        print(f"dmc bench: {exc}", file=sys.stderr)
        return 2
    try:
        llm = LLM(args.model, config=config, progress=False)
    except load_errors() as exc:
        print(f"dmc bench: {describe_load_error(args.model, exc)}", file=sys.stderr)
        return 2
    try:
        result = measure_throughput(llm, args.prompt_len, args.gen_len, measure_steps=args.measure_steps,
                                    progress=not args.json)
    except ValueError as exc:
        print(f"dmc bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"device": _device_name(llm), **result.to_dict()}))
    else:
        print(f"{_device_name(llm)}: {result.tokens_per_s:,.0f} output tok/s at batch {result.batch} "
              f"(step {result.step_ms:.2f} ms), realized CR {result.realized_cr:.2f}, prefill "
              f"{result.prefill_tokens_per_s:,.0f} tok/s, peak memory {result.peak_memory_gib:.1f} GiB"
              f"{' (process RSS)' if llm.device.type == 'cpu' else ''}, "
              f"KV pool {result.kv_pool_gib:.1f} GiB, preemptions {result.preemptions}")
    return 0


def _device_name(llm) -> str:
    import torch
    return torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu"
