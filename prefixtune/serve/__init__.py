"""HTTP serving of many tenants' prefixes from one frozen base model, with mixed-prefix batching.

``prefixtune serve`` (see cli.py) builds a :class:`ServeConfig`, loads the model once and runs the
FastAPI app from :func:`create_app` under uvicorn. Pieces:

- :mod:`.registry`: per-tenant prefix files on disk (atomic writes) + a bounded in-memory LRU.
- :mod:`.scheduler`: one worker thread that batches queued rows across prefixes and runs
  ``prefixtune.generate`` once per batch.
- :mod:`.app`: the HTTP routes, auth, limits, /healthz and /metrics.
"""

from .app import ServeConfig, create_app, load_keys, serve

__all__ = ["ServeConfig", "create_app", "load_keys", "serve"]
