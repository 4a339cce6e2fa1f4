"""``dmc eval``: held-out perplexity (both modes), realized CR with a heatmap, recall probe."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

NAME = "eval"
HELP = ("evaluate a local HF model (DMC or plain): held-out perplexity in full-sequence mode and, for DMC, "
        "through the compressed cache and in training mode (relaxed decisions); realized CR per layer/head "
        "(+ heatmap PNG); key-value recall probe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local Hugging Face model directory")
    parser.add_argument("--data", nargs="+", required=True, help="held-out text: files, directories, globs, .jsonl")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-windows", type=int, default=64, help="at most this many windows of seq-len tokens")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--recall-pairs", type=int, default=20, help="key-value pairs per recall prompt (0: skip)")
    parser.add_argument("--recall-trials", type=int, default=20)
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--heatmap", help="write the per-layer/per-head CR heatmap PNG here (DMC models)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import dmc  # noqa: F401 - registers the DMC model types
    from ..eval import compression_heatmap, compression_report, perplexity, recall_probe
    from ..train.config import ConfigError
    from ..train.data import discover_files, read_documents

    try:
        if not (pathlib.Path(args.model) / "config.json").is_file():
            raise ConfigError(f"{args.model} is not a Hugging Face model directory (no config.json)")
        files = discover_files(args.data)
        texts = [doc for f in files for doc in read_documents(f, args.text_field)]
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        is_dmc = hasattr(model.config, "dmc")
        report: dict = {"model": str(args.model), "dmc": getattr(model.config, "dmc", None), "seq_len": args.seq_len}
        common = dict(seq_len=args.seq_len, max_windows=args.max_windows, batch_size=args.batch_size, progress=True)
        full = perplexity(model, tokenizer, texts, mode="full", **common)
        report["perplexity_full_sequence"] = full.perplexity
        report["windows"] = full.windows
        if is_dmc:
            cached = perplexity(model, tokenizer, texts, mode="cache", **common)
            report["perplexity_compressed_cache"] = cached.perplexity
            report["perplexity_relaxed"] = perplexity(model, tokenizer, texts, mode="relaxed", **common).perplexity
            report["compression"] = compression_report(cached.compression)
            if args.heatmap:
                compression_heatmap(cached.compression, args.heatmap, title=pathlib.Path(args.model).name)
        if args.recall_pairs > 0:
            report["recall"] = recall_probe(model, tokenizer, args.recall_pairs, args.recall_trials)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    summary = f"perplexity {report['perplexity_full_sequence']:.3f} (full sequence)"
    if is_dmc:
        summary += (f", {report['perplexity_compressed_cache']:.3f} (compressed cache); "
                    f"realized CR {report['compression']['cr']:.2f}; {report['perplexity_relaxed']:.3f} in training "
                    "mode (relaxed decisions)")
    if "recall" in report:
        summary += f"; recall {report['recall']['accuracy']:.0%} of {args.recall_trials}"
    print(summary)
    return 0
