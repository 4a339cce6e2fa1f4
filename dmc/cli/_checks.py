"""Checks of a model directory made before it is loaded, so that a command fails in one line naming
what to do (and not after seconds of loading, or with the loader's words for another problem)."""

from __future__ import annotations

import json
import pathlib

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weights(model: str) -> None:
    """ValueError when the directory holds no weight file at all (an unfinished save or copy: the
    config alone was written); a weight file that is there but unreadable is the loader's to report."""
    folder = pathlib.Path(model)
    if not any((folder / name).is_file() for name in WEIGHT_FILES) and not any(folder.glob("*.safetensors")) \
            and not any(folder.glob("pytorch_model*.bin")):
        raise ValueError(f"{model} holds a config.json but no weight file ({', '.join(WEIGHT_FILES[::2])}, or "
                         "sharded with an .index.json): the model was not saved or copied completely; save or copy "
                         "it again")


def model_type(model: str) -> str | None:
    """The ``model_type`` of a model directory's config.json (None if it cannot be read: the loader says why)."""
    try:
        return json.loads((pathlib.Path(model) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_eviction(model: str, eviction: str | None, vanilla: bool, forced_cr: int = 0) -> None:
    """ValueError naming the flag when --eviction is asked of a DMC model without --vanilla (H2O, TOVA
    and SnapKV evict from the uncompressed cache: every token appends)."""
    if eviction is None:
        return
    if forced_cr:
        raise ValueError(f"--eviction {eviction} runs the model uncompressed; --forced-cr compresses it: give one "
                         "of them")
    kind = model_type(model)
    if kind is not None and kind.startswith("dmc_") and not vanilla:
        raise ValueError(f"--eviction {eviction} runs the model uncompressed, and {model} is a DMC model: add "
                         "--vanilla (every token appends; the eviction policy then keeps the budget)")


def max_positions(model: str) -> int | None:
    """The context the model was trained on (``max_position_embeddings`` of its config.json), or None."""
    try:
        value = json.loads((pathlib.Path(model) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None
