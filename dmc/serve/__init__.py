"""``dmc serve``: an OpenAI-compatible HTTP server on the engine (needs ``pip install 'dmc[serve]'``).

- :mod:`.protocol`: request bodies (pydantic) and the OpenAI error object.
- :mod:`.engine_core`: the loop that owns :class:`dmc.LLM` and batches every client's requests, in a process of
  its own (or a thread), speaking in one message per engine step.
- :mod:`.engine_loop`: the server's side of it: submit, abort, each step's outputs to the HTTP requests.
- :mod:`.app`: the FastAPI routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
  ``/health``, ``/metrics``), auth, errors, the per-request log line.
- :mod:`.metrics`: the Prometheus metrics.
"""

from .app import ServerConfig, build_app
from .engine_loop import EngineLoop, EngineProcess
from .metrics import Metrics

__all__ = ["EngineLoop", "EngineProcess", "Metrics", "ServerConfig", "build_app"]
