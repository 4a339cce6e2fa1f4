"""Write a model directory for the serving study: the Llama-2-7B-shaped DMC model of benchmarks/throughput.py
(random bf16 weights, built on the GPU; `dmc serve --forced-cr R` drives its decisions, `--vanilla` turns them
off), or with --tiny a tiny one for a CPU smoke run (--plain: a plain Llama with a tokenizer, as an imported
GGUF would be).

    python experiments/serve/make_benchmark_model.py DIR [--tiny [--plain]]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke runs)")
    parser.add_argument("--plain", action="store_true", help="with --tiny: a plain Llama with a tokenizer")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    if (out / "config.json").is_file():
        print("exists:", out)
        return
    if args.tiny:
        import dmc
        from dmc.tiny import write_tiny_model_dir
        texts = [(ROOT / "dmc" / name).read_text() for name in ("core.py", "config.py", "stats.py")]
        write_tiny_model_dir(out, texts, vocab_size=300, hidden=32, max_positions=256)
        if not args.plain:
            import transformers
            model = dmc.convert(transformers.AutoModelForCausalLM.from_pretrained(out), dmc.DMCConfig(window=4))
            model.save_pretrained(out)
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from throughput import build_model  # the benchmark's own 7B shape
        build_model(dmc_model=True).save_pretrained(out)
    print("saved", out)


if __name__ == "__main__":
    main()
