"""HTTP serving of many tenants' prefixes from one frozen base model, batching across prefixes.

``prefixtune serve`` (see cli.py) builds a :class:`ServeConfig`, loads the model once and runs the
FastAPI app from :func:`create_app` under uvicorn. Pieces:

- :mod:`.registry`: per-tenant prefix files on a (shareable) disk, atomic writes, version-checked LRU.
- :mod:`.scheduler`: one worker thread that owns the model: continuous batching through
  :mod:`.engine`, or dynamic batches through ``prefixtune.generate``.
- :mod:`.engine`: iteration-level batching of rows with their own prefixes and settings.
- :mod:`.output`: a row's tokens -> text, stop sequences, finish reason, streamed deltas.
- :mod:`.app`: the HTTP routes, auth, limits, errors, /healthz and /metrics.
- :mod:`.openai`: the OpenAI-shaped routes (completions, chat completions, models).
"""

from .app import ServeConfig, create_app, load_keys, serve

__all__ = ["ServeConfig", "create_app", "load_keys", "serve"]
