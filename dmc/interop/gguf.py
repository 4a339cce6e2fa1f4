"""GGUF files (llama.cpp's format) in: a stock Hugging Face model directory out.

transformers reads GGUF directly (dequantising the weights to float), but the model it returns
refuses ``save_pretrained`` ("quantized with gguf"). Copying its state into a plain model of the
same config gives an ordinary directory that every part of dmc (retrofit, eval, the engine) loads.
Needs the ``gguf`` package (``pip install 'dmc[gguf]'``, in ``[dev]`` too).
"""

from __future__ import annotations

import pathlib

import torch


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported; the message says why."""


def import_gguf(gguf_file: str | pathlib.Path, out: str | pathlib.Path, dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """Write ``gguf_file`` as a Hugging Face model directory (weights, config, tokenizer) into ``out``."""
    import transformers

    path = pathlib.Path(gguf_file).expanduser()
    out = pathlib.Path(out).expanduser()
    if not path.is_file():
        raise GGUFImportError(f"{path} is not a file; pass a .gguf file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFImportError(f"{out} exists and is not an empty directory; choose a new --out")
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise GGUFImportError("reading GGUF needs the gguf package: pip install 'dmc[gguf]' (or pip install gguf)") from e
    kwargs = {"gguf_file": path.name}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    except Exception as e:  # noqa: BLE001 - any reader failure gets the file named
        raise GGUFImportError(f"could not read {path} as a GGUF model ({type(e).__name__}: {e})") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(dtype)
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
