"""Prometheus text-format metrics, kept by hand (no extra dependency). Labels never hold API keys."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.n = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.n += 1
        self.sum += v
        for i, b in enumerate(BUCKETS):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(BUCKETS, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:g}", f"{name}_count {self.n}"]
        return out


class Metrics:
    def __init__(self, window_s: float = 30.0):
        self._lock = threading.Lock()
        self.started = time.time()
        self.queue_depth = 0
        self.batch_rows = Histogram()
        self.batch_prefixes = Histogram()
        self.max_prefixes_in_batch = 0
        self.mixed_batches = 0
        self.batches = 0
        self.generated_tokens = 0
        self.busy_seconds = 0.0
        self.failed_rows = 0
        self.requests = defaultdict(int)  # (tenant, prefix) -> count
        self.rejected = defaultdict(int)  # reason -> count
        self._recent = deque()  # (time, tokens)
        self.window_s = window_s

    def record_failed(self, rows: int) -> None:
        with self._lock:
            self.failed_rows += rows

    def record_batch(self, rows: int, distinct_prefixes: int, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.batches += 1
            self.batch_rows.observe(rows)
            self.batch_prefixes.observe(distinct_prefixes)
            self.max_prefixes_in_batch = max(self.max_prefixes_in_batch, distinct_prefixes)
            self.mixed_batches += distinct_prefixes > 1
            self.generated_tokens += tokens
            self.busy_seconds += seconds
            self._recent.append((now, tokens))

    def record_request(self, tenant: str, prefix: str | None) -> None:
        with self._lock:
            self.requests[(tenant, prefix or "base")] += 1

    def record_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > self.window_s:
                self._recent.popleft()
            if not self._recent:
                return 0.0
            span = max(now - self._recent[0][0], 1.0)
            return sum(t for _, t in self._recent) / span

    def render(self, registry_stats: dict) -> str:
        tps = self.tokens_per_second()
        with self._lock:
            m = [
                "# HELP prefixtune_queue_depth Rows waiting for a batch.", "# TYPE prefixtune_queue_depth gauge",
                f"prefixtune_queue_depth {self.queue_depth}",
                "# HELP prefixtune_batch_rows Rows per batch (a generate call, or a continuous-batching decoding step).", "# TYPE prefixtune_batch_rows histogram",
                *self.batch_rows.lines("prefixtune_batch_rows"),
                "# HELP prefixtune_batch_prefixes Distinct prefixes (base model counts as one) per batch.",
                "# TYPE prefixtune_batch_prefixes histogram",
                *self.batch_prefixes.lines("prefixtune_batch_prefixes"),
                "# HELP prefixtune_batch_prefixes_max Most distinct prefixes seen in one batch.",
                "# TYPE prefixtune_batch_prefixes_max gauge",
                f"prefixtune_batch_prefixes_max {self.max_prefixes_in_batch}",
                "# HELP prefixtune_mixed_batches_total Batches holding more than one prefix.",
                "# TYPE prefixtune_mixed_batches_total counter",
                f"prefixtune_mixed_batches_total {self.mixed_batches}",
                "# HELP prefixtune_batches_total Batches run (generate calls, or continuous-batching decoding steps).", "# TYPE prefixtune_batches_total counter",
                f"prefixtune_batches_total {self.batches}",
                "# HELP prefixtune_generated_tokens_total Generated tokens (as generated, a final EOS included).",
                "# TYPE prefixtune_generated_tokens_total counter",
                f"prefixtune_generated_tokens_total {self.generated_tokens}",
                "# HELP prefixtune_tokens_per_second Generated tokens per second over the last 30 s.",
                "# TYPE prefixtune_tokens_per_second gauge",
                f"prefixtune_tokens_per_second {tps:.3f}",
                "# HELP prefixtune_failed_rows_total Rows whose generation raised even when run alone (their requests got 422).",
                "# TYPE prefixtune_failed_rows_total counter",
                f"prefixtune_failed_rows_total {self.failed_rows}",
                "# HELP prefixtune_busy_seconds_total Seconds spent generating.",
                "# TYPE prefixtune_busy_seconds_total counter",
                f"prefixtune_busy_seconds_total {self.busy_seconds:.3f}",
                "# HELP prefixtune_requests_total Accepted generation requests per tenant and prefix.",
                "# TYPE prefixtune_requests_total counter",
            ]
            for (tenant, prefix), n in sorted(self.requests.items()):
                m.append(f'prefixtune_requests_total{{tenant="{_esc(tenant)}",prefix="{_esc(prefix)}"}} {n}')
            m += ["# HELP prefixtune_rejected_total Rejected generation requests by reason.",
                  "# TYPE prefixtune_rejected_total counter"]
            for reason, n in sorted(self.rejected.items()):
                m.append(f'prefixtune_rejected_total{{reason="{_esc(reason)}"}} {n}')
        m += ["# HELP prefixtune_prefixes_registered Prefixes on disk (all tenants).",
              "# TYPE prefixtune_prefixes_registered gauge",
              f"prefixtune_prefixes_registered {registry_stats['registered']}",
              "# HELP prefixtune_prefixes_in_memory Prefixes held in memory (LRU).",
              "# TYPE prefixtune_prefixes_in_memory gauge",
              f"prefixtune_prefixes_in_memory {registry_stats['in_memory']}",
              "# HELP prefixtune_prefix_loads_total Prefix loads from disk after LRU eviction.",
              "# TYPE prefixtune_prefix_loads_total counter",
              f"prefixtune_prefix_loads_total {registry_stats['loads_from_disk']}"]
        return "\n".join(m) + "\n"
