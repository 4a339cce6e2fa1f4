"""``dmc generate``: generate from a local model with the engine."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ._checks import check_eviction, check_weights, max_positions
from ._engine_args import add_engine_arguments, describe_load_error, engine_config, load_errors

if TYPE_CHECKING:
    from ..engine.config import EngineConfig

NAME = "generate"
HELP = "generate text with the DMC inference engine (paged per-head cache); prints each completion and its CR"
HELP_DEFAULTS = True


class _Default(int):
    """A default value told apart from the same number given on the command line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    # Not given on CPU: the pool is sized to the prompts at hand (see _size_to_prompts).
    parser.set_defaults(max_num_seqs=_Default(256))
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompt-file", help="one prompt per line, or .jsonl with a 'prompt' field; - = stdin")
    parser.add_argument("--max-tokens", type=int, default=_Default(128),
                        help="most new tokens per prompt (default: 128); the default stops at the context, a "
                             "number given that it has no room for is refused")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set reaching p")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: drawn by the engine)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (with --stream: one per update, the last with "
                             "the whole result)")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        jsonl = args.prompt_file.endswith(".jsonl")
        try:
            handle = sys.stdin if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror or exc}") from exc
        with handle:
            try:
                for n, line in enumerate(handle, 1):
                    line = line.rstrip("\n")
                    if not line.strip():
                        continue
                    prompts.append(_jsonl_prompt(args.prompt_file, n, line) if jsonl else line)
            except UnicodeDecodeError as exc:
                raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({exc.reason} at byte "
                                 f"{exc.start} of a line)") from exc
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    return prompts


def _jsonl_prompt(path: str, n: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{n} is not valid JSON ({exc.msg}); each line must be an object with a "
                         "'prompt' field") from exc
    if not isinstance(record, dict) or "prompt" not in record:
        raise ValueError(f"{path}:{n} has no 'prompt' field; each line must be an object like "
                         '{"prompt": "..."} (or use a plain text file: one prompt per line)')
    if not isinstance(record["prompt"], str):
        raise ValueError(f"{path}:{n}: 'prompt' must be a string, got {type(record['prompt']).__name__}")
    return record["prompt"]


def run(args: argparse.Namespace) -> int:
    from ..engine import LLM, SamplingParams

    try:
        prompts = _read_prompts(args)
        if args.stream and len(prompts) != 1:
            raise ValueError(f"--stream takes one prompt, got {len(prompts)}")
        params = SamplingParams(max_tokens=int(args.max_tokens), temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
        params.validate()
        config = engine_config(args)
        config = config.replace(max_num_seqs=int(config.max_num_seqs))
        check_weights(args.model)
        check_eviction(args.model, args.eviction, args.vanilla)
        tokenizer = _tokenizer(args.model)
        if tokenizer is not None:
            lengths = [len(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
            _check_room(lengths, args, config.max_model_len or max_positions(args.model))
            config = _size_to_prompts(lengths, args, config)
    except ValueError as exc:
        print(f"dmc generate: {exc}", file=sys.stderr)
        return 2
    try:
        llm = LLM(args.model, config=config, progress=not args.stream and not args.json, tokenizer=tokenizer)
    except load_errors() as exc:
        print(f"dmc generate: {describe_load_error(args.model, exc)}", file=sys.stderr)
        return 2
    if llm.tokenizer is None:
        print("dmc generate: the model directory has no tokenizer; use the Python API with token ids",
              file=sys.stderr)
        return 2
    if args.stream:
        return _stream(llm, prompts, params, args.json)
    failed = 0
    for out in llm.generate(prompts, params):
        failed += out.error is not None
        if args.json:
            print(json.dumps(_result(out)))
        elif out.error:
            print(f"--- prompt {out.request_id}: error: {out.error}")
        else:
            print(f"--- prompt {out.request_id} [{out.finish_reason}; {_cr(out)}]\n{out.prompt}{out.text}")
    return 1 if failed else 0


def _tokenizer(model: str):
    """The model's tokenizer, or None where it does not load (the engine's load then says why)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception:  # noqa: BLE001 - reported by the model load that follows
        return None


def _check_room(lengths: list[int], args, context: int | None) -> None:
    """A --max-tokens given beyond the room the context leaves the longest prompt is refused (as the
    server answers such a request: context_length_exceeded). The default stops at the context; a
    prompt that does not fit at all is the engine's to report, request by request."""
    if context is None or isinstance(args.max_tokens, _Default):
        return
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    room = context - lengths[longest]
    if 0 < room < args.max_tokens:
        which = "the prompt" if len(lengths) == 1 else f"prompt {longest} (the longest)"
        limit = "--max-model-len" if args.max_model_len is not None else "the model's context"
        raise ValueError(f"--max-tokens {args.max_tokens} does not fit: {which} has {lengths[longest]} tokens of "
                         f"{limit} {context}, leaving room for {room} new tokens; give --max-tokens {room} or less"
                         f"{'' if args.max_model_len is None else ', or raise --max-model-len'}")


def _size_to_prompts(lengths: list[int], args, config: EngineConfig) -> EngineConfig:
    """On CPU, when no engine size is given (--max-num-seqs, --max-model-len, --kv-cache-memory-gib),
    the sizes are the prompts' own: as many sequences as prompts (not 256) and as many positions as
    the longest prompt and its new tokens take (not the model's whole context), so that the page pool
    holds what these requests use and no more. One size given: the others are the engine's defaults."""
    from ..engine.llm import resolve_device

    given = (not isinstance(args.max_num_seqs, _Default) or args.max_model_len is not None
             or args.kv_cache_memory_gib is not None)
    if given or resolve_device(args.device).type != "cpu":
        return config
    config = config.replace(max_num_seqs=min(int(args.max_num_seqs), len(lengths)))
    context = max_positions(args.model)
    if context is not None:
        needed = max(lengths) + args.max_tokens
        if args.eviction_budget is not None:
            needed = max(needed, args.eviction_budget + 1)  # a budget below the length, or nothing is evicted
        config = config.replace(max_model_len=max(2, min(context, needed)))
    return config


def _stream(llm, prompts: list[str], params, as_json: bool) -> int:
    """Print one prompt's tokens as they come; a failed request is reported as without --stream
    (its reason, exit status 1). With ``as_json``: one JSON line per update (``new_text``,
    ``new_token_ids``, ``finished``), the last one also carrying the whole result."""
    failed = False
    for update in llm.stream(prompts, params):
        failed |= update.error is not None
        if as_json:
            line = {"request_id": update.request_id, "new_text": update.new_text,
                    "new_token_ids": update.new_token_ids, "finished": update.finished}
            if update.finished:
                line.update(_result(update))
            print(json.dumps(line), flush=True)
        elif update.error is not None:
            print(f"--- prompt {update.request_id}: error: {update.error}", flush=True)
        else:
            sys.stdout.write(update.new_text)
            sys.stdout.flush()
            if update.finished:
                print(f"\n[{update.finish_reason}; {_cr(update)}]")
    return 1 if failed else 0


def _result(out) -> dict:
    return {"prompt": out.prompt, "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "error": out.error, "compression": out.compression}


def _cr(out) -> str:
    if not out.compression:
        return "no cache"
    c = out.compression
    return f"CR {c['cr']:.2f} ({c['tokens']} tokens, {c['slots']} slots over all layers and heads)"
