"""The offline engine on a serving load: ``LLM.generate`` with the tokenizer (text out, detokenized as the server
does) on the very requests `benchmarks/serve_load.py` would send (same flags, same seed), at most
``--concurrency`` sequences at once (the server's concurrent clients). Its output tok/s is what the server at
saturation is compared against.

    python benchmarks/offline_generate.py --model DIR --engine-args "--max-num-seqs 256 --kv-cache-memory-gib 1" \\
        --concurrency 128 --requests 256 --prompt-lens 1024 --gen-lens 256 --prompt-text /usr/lib/python3.11/json \\
        --out offline.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model directory")
    parser.add_argument("--engine-args", default="", help="`dmc serve` engine flags, one string")
    parser.add_argument("--concurrency", type=int, required=True, help="most sequences at once (--max-num-seqs)")
    parser.add_argument("--out", default=None, help="a JSON file for the result")
    args, load_flags = parser.parse_known_args(argv)

    import serve_load  # the load generator's own request mix
    import torch

    from dmc.cli._engine_args import add_engine_arguments, engine_config
    from dmc.engine import LLM, SamplingParams
    from dmc.engine.step_timer import StepTimer

    load = serve_load.parse_args(["--model", args.model, *load_flags])
    bodies = serve_load.build_bodies(load, "offline")
    engine_parser = argparse.ArgumentParser()
    add_engine_arguments(engine_parser)
    engine = engine_parser.parse_args([args.model, *shlex.split(args.engine_args), "--max-num-seqs",
                                       str(args.concurrency)])
    llm = LLM(args.model, config=engine_config(engine), progress=False)
    if llm.device.type == "cuda":
        llm.warmup()
    prompts = [b["prompt"] for b in bodies]
    params = [SamplingParams(max_tokens=b["max_tokens"], temperature=0.0, ignore_eos=True) for b in bodies]
    llm.generate(prompts[:2], [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 2)  # as the load's warm-up
    llm.step_timer = StepTimer()  # the measured requests' steps only
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    out_tokens = sum(len(o.token_ids) for o in outputs)
    in_tokens = sum(len(p) for p in prompts)
    failed = sum(o.finish_reason not in ("length", "stop") for o in outputs)
    slots = sum(o.compression["slots"] for o in outputs if o.compression)
    cr = sum(o.compression["cr"] * o.compression["slots"] for o in outputs if o.compression) / slots if slots else None
    result = {"model": args.model, "engine_args": args.engine_args, "concurrency": args.concurrency,
              "requests": len(bodies), "failed": failed, "wall_s": wall, "output_tokens": out_tokens,
              "output_tokens_per_s": out_tokens / wall, "total_tokens_per_s": (out_tokens + in_tokens) / wall,
              "realized_cr": cr, "detokenized": llm.tokenizer is not None,
              "device": torch.cuda.get_device_name() if llm.device.type == "cuda" else "cpu",
              "commit": serve_load.git_commit(), "step_profile": llm.step_timer.summary()}
    print(json.dumps(result))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"offline engine: {result['output_tokens_per_s']:,.0f} output tok/s, {len(bodies)} requests at concurrency "
          f"{args.concurrency}, {failed} failed")


if __name__ == "__main__":
    main()
