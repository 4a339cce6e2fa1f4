"""Engine options shared by ``dmc generate`` and ``dmc bench``."""

from __future__ import annotations

import argparse
import pathlib


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local Hugging Face model directory (DMC or plain Llama/Mistral/Qwen2/Qwen3)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest prompt + generation (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most sequences decoded together")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None, help="page pool size, overriding the above")
    parser.add_argument("--vanilla", action="store_true", help="run a DMC model uncompressed (every token appends)")
    parser.add_argument("--no-cuda-graphs", action="store_true")


def engine_kwargs(args: argparse.Namespace) -> dict:
    if not (pathlib.Path(args.model) / "config.json").is_file():
        raise ValueError(f"{args.model} is not a Hugging Face model directory (no config.json)")
    kv = None if args.kv_cache_memory_gib is None else int(args.kv_cache_memory_gib * 2**30)
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory=kv, vanilla=args.vanilla,
                cuda_graphs=not args.no_cuda_graphs)
