"""Iteration-level (continuous) batching across prefixes, for decoder-only models.

One running batch of up to ``max_rows`` rows, each with its own prefix (or none), sampling
settings and length. Every :meth:`Engine.step`:

1. one decoding forward for all running rows (each feeds its last token), then each row's next
   token: greedy, or sampled with its own temperature/top-p and its own random generator;
2. prefill of waiting rows, up to ``prefill_chunk`` prompt tokens per step: waiting prompts in one
   left-padded forward (as ``generate`` batches them), or the next chunk of a prompt longer than
   that alone, so newcomers stall the running rows by one such forward at most. A row whose
   prompt is done gets its first token and joins the running batch.

The caller decides when a row is finished (EOS, stop sequence, length, cancelled) and calls
:meth:`Engine.finish`; it leaves before the next step.

Exactness. Prompts are prefilled as ``prefixtune.generate`` batches them (left padding masked,
positions counted from each row's first token). A decoding step gives each row exactly its own keys (its prefix's and its cache's, the rest
masked), so greedy rows produce what ``prefixtune.generate`` produces for them alone, and a
sampled row with a seed the same tokens whatever else runs beside it: sampling applies the
logits processors transformers' ``generate`` builds for the row's settings (temperature, top-k,
top-p), then draws from the row's own generator. Rows whose settings need processors other than temperature,
top-k and top-p (set by the model's generation config, e.g. a repetition penalty) are refused
(:meth:`supports`), as are encoder-decoder models and sliding-window attention; the scheduler
serves those with its batch path.

KV cache. Running row i lives in slot i of per-layer buffers ``[max_rows, kv_heads, capacity,
head_dim]``; column = position (nothing in front of a row's tokens). A step writes each row's new
key/value at its own column and attends to columns ``[0, its length]``; the buffers grow when
a row needs more columns. A finished row's slot is refilled with the last row (a copy of one
row), so the running rows always fill slots 0..n-1. Prefixes sit in per-slot buffers in the same
way and reach attention through prefixtune's attention function, as in ``prefixtune.generate``.

Why not transformers' own continuous batching (``generate_batch``/``init_continuous_batching``):
it accepts only the ``paged|eager``, ``sdpa`` and flash attention implementations (ours is
refused by name), calls the model with a fixed set of arguments (no per-request ``prefix_batch``
can reach attention), flattens all requests into one sequence, and samples with one global
setting and random stream; see results/serve.md.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import Cache, DynamicCache

from .. import attach, cpu_bf16
from ..attach import PrefixBatch
from ..generate import token_logprobs_at
from ..batch import make_batch
from ..prefix import Prefix

log = logging.getLogger("prefixtune.serve")

SAMPLING_PROCESSORS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


@dataclass(eq=False)
class Seq:
    """One row: its prompt (token ids), prefix, settings; ``tag`` is the caller's."""

    prompt: list[int]
    prefix: Prefix | None
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    min_new_tokens: int = 0  # EOS cannot be chosen before this many tokens (generate's min_new_tokens)
    tag: object = None
    # engine state
    prefilled: int = 0
    cache: object = field(default=None, repr=False)  # while prefilling: a DynamicCache, then [(keys, values)] per layer
    generator: torch.Generator | None = field(default=None, repr=False)
    last: int = -1
    generated: int = 0
    finished: bool = False


class _SlotCache(Cache):
    """The cache a decoding step sees: slots ``a:b`` of the engine's buffers, each row writing its
    new key/value at its own column ``lens[i]`` and reading columns ``[0, width)``."""

    def __init__(self, engine: "Engine", a: int, b: int, lens: torch.Tensor, width: int):
        super().__init__(layers=[])
        self.engine, self.a, self.b, self.lens, self.width = engine, a, b, lens, width
        self.rows = torch.arange(a, b, device=lens.device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.engine.kv[layer_idx]
        k[self.rows, :, self.lens] = key_states[:, :, 0].to(k.dtype)
        v[self.rows, :, self.lens] = value_states[:, :, 0].to(v.dtype)
        return k[self.a : self.b, :, : self.width], v[self.a : self.b, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width - 1

    def __len__(self) -> int:
        return len(self.engine.kv)


class Engine:
    def __init__(self, model, eos: int, max_rows: int = 32, prefill_chunk: int = 256):
        self.check_model(model)
        attach.enable(model)
        self.model, self.eos = model, eos
        self.head_dims = attach.prefix_shapes(model).head_dims["self"]
        self.max_rows, self.prefill_chunk = int(max_rows), max(1, int(prefill_chunk))
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.rows: list[Seq] = []  # running; rows[i] is in slot i
        self.waiting: deque[Seq] = deque()  # to prefill, in order
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer [max_rows, heads, capacity, dim]
        self.lens = torch.zeros(self.max_rows, dtype=torch.long, device=self.device)  # tokens cached per slot
        self.pk = self.pv = None  # [layers, max_rows, heads, prefix capacity, dim]
        self.pmask = torch.zeros(self.max_rows, 0, dtype=torch.bool, device=self.device)
        self.plen = [0] * self.max_rows
        self._processors: dict[tuple, LogitsProcessorList] = {}
        # a bfloat16 model on a CPU without bfloat16 kernels: its products in float32 (prefixtune/cpu_bf16.py),
        # one instance kept across steps with its float32 copies of the weights
        self.products = cpu_bf16.products(model)

    # -- what can run here ---------------------------------------------------------------------
    @staticmethod
    def check_model(model) -> None:
        """Raise ValueError naming the reason if this engine cannot serve ``model`` exactly."""
        c = model.config.get_text_config()  # multimodal models: the language model's
        name = type(model).__name__
        if attach.is_seq2seq(model):
            raise ValueError(f"{name} is an encoder-decoder model; continuous batching serves decoder-only models")
        layer_types = set(getattr(c, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"} or getattr(c, "use_sliding_window", False):
            raise ValueError(f"{name} uses attention other than full attention ({sorted(layer_types)}, sliding "
                             "window); continuous batching would not apply it")

    def processors(self, do_sample: bool, temperature: float, top_p: float) -> LogitsProcessorList:
        """The logits processors transformers' generate() uses for these settings on this model;
        ValueError if they are not only temperature, top-k and top-p (which this engine applies)."""
        key = (do_sample, temperature, top_p)
        if key not in self._processors:
            kwargs = dict(do_sample=do_sample, eos_token_id=self.eos, pad_token_id=self.eos)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            config, _ = self.model._prepare_generation_config(None, **kwargs)
            found = self.model._get_logits_processor(config, input_ids_seq_length=1, device=self.device,
                                                     logits_processor=LogitsProcessorList(), model_kwargs={})
            extra = [type(p).__name__ for p in found if not isinstance(p, SAMPLING_PROCESSORS)]
            if extra:
                raise ValueError(f"the model's generation config adds {extra}, which continuous batching does not apply")
            self._processors[key] = found
        return self._processors[key]

    def supports(self, seq: Seq) -> bool:
        try:
            self.processors(seq.do_sample, seq.temperature, seq.top_p)
        except ValueError as e:
            log.info("row served by the batch path: %s", e)
            return False
        return True

    # -- the caller's API ----------------------------------------------------------------------
    def free(self) -> int:
        """Rows that can be added now."""
        return self.max_rows - len(self.rows) - len(self.waiting)

    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def add(self, seq: Seq) -> None:
        if seq.do_sample:
            seed = seq.seed if seq.seed is not None else int(torch.randint(0, 2**62, (1,)))
            seq.generator = torch.Generator(self.device).manual_seed(seed)
        self.waiting.append(seq)

    def finish(self, seq: Seq) -> None:
        """Remove a row (finished, failed or cancelled), running or waiting."""
        if seq.finished:
            return
        seq.finished, seq.cache = True, None
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
        i, last = self.rows.index(seq), len(self.rows) - 1
        if i != last:  # the last row moves into the freed slot
            n = int(self.lens[last])
            for k, v in self.kv:
                k[i, :, :n] = k[last, :, :n]
                v[i, :, :n] = v[last, :, :n]
            self.lens[i] = self.lens[last]
            self.rows[i] = self.rows[last]
            self._set_prefix(i, self.rows[i].prefix)
        self.rows.pop()

    def step(self) -> list[tuple[Seq, int | BaseException, tuple | None]]:
        """One decoding step and some prefill. Returns (row, token, logprob) for every token made,
        or (row, exception) for a row that failed (only that row: the caller should finish it)."""
        with self.products:
            return self._step()

    def _step(self) -> list[tuple[Seq, int | BaseException, tuple | None]]:
        events = self._decode_isolated(0, len(self.rows)) if self.rows else []
        room = self.max_rows - len(self.rows)
        group, width = [], 0  # waiting prompts that fit the budget together (left-padded to the longest)
        while self.waiting and len(group) < room and self.waiting[0].prefilled == 0:
            w = max(width, len(self.waiting[0].prompt))
            if (len(group) + 1) * w > self.prefill_chunk:
                break
            group.append(self.waiting.popleft())
            width = w
        if group:
            events += self._prefill_isolated(group)
        elif self.waiting and room:  # a prompt longer than the budget: its next chunk, alone
            seq = self.waiting[0]
            try:
                logits = self._prefill_chunk(seq, min(self.prefill_chunk, len(seq.prompt) - seq.prefilled))
                if logits is not None:
                    self.waiting.popleft()
                    events += self._start([seq], logits)
            except Exception as e:
                log.error("prefill of a row failed", exc_info=e)
                self.waiting.popleft()
                events.append(self._drop(seq, e))
        return events

    def _drop(self, seq: Seq, error: BaseException) -> tuple:
        seq.finished, seq.cache = True, None
        return (seq, error, None)

    # -- prefill -------------------------------------------------------------------------------
    def _prefill_isolated(self, group: list[Seq]) -> list:
        """Prefill ``group`` in one forward; if it raises, each row again alone."""
        try:
            logits = self._prefill(group)
        except Exception as e:
            if len(group) == 1:
                log.error("prefill of a row failed", exc_info=e)
                return [self._drop(group[0], e)]
            log.warning("prefill of %d rows failed (%s: %s); running its rows one by one", len(group),
                        type(e).__name__, e)
            return [event for seq in group for event in self._prefill_isolated([seq])]
        return self._start(group, logits)

    def _start(self, seqs: list[Seq], logits: torch.Tensor) -> list:
        """First tokens of prefilled rows; each joins the running batch."""
        events = []
        for seq, (token, logprob) in zip(seqs, self._choose(seqs, logits)):
            try:
                if isinstance(token, BaseException):
                    raise token
                self._join(seq, token)
                events.append((seq, token, logprob))
            except Exception as e:  # this row only (_join adds the row to the batch as its last act)
                log.error("starting a row failed", exc_info=e)
                events.append(self._drop(seq, e))
        return events

    @torch.no_grad()
    def _prefill(self, seqs: list[Seq]) -> torch.Tensor:
        """Whole prompts in one forward, left-padded (as generate batches them); each row's keys and
        values, without the padding, go to ``seq.cache``. Returns the last position's logits."""
        width = max(len(s.prompt) for s in seqs)
        pads = [width - len(s.prompt) for s in seqs]
        ids = torch.tensor([[self.eos] * p + s.prompt for s, p in zip(seqs, pads)], device=self.device)
        mask = torch.tensor([[0] * p + [1] * len(s.prompt) for s, p in zip(seqs, pads)], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        pb = make_batch([s.prefix for s in seqs], self.device, separators=[width - 1] * len(seqs))
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, prefix_batch=pb,
                         use_cache=True, logits_to_keep=1)
        for i, (seq, p) in enumerate(zip(seqs, pads)):
            seq.cache = [(layer.keys[i, :, p:], layer.values[i, :, p:]) for layer in cache.layers]
        return out.logits[:, -1]

    @torch.no_grad()
    def _prefill_chunk(self, seq: Seq, n: int) -> torch.Tensor | None:
        """The next ``n`` prompt tokens of a long prompt, alone; the last position's logits when done."""
        if seq.cache is None:
            seq.cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([seq.prompt[seq.prefilled : seq.prefilled + n]], device=self.device)
        pb = make_batch([seq.prefix], self.device, separators=[len(seq.prompt) - 1])
        out = self.model(input_ids=ids, cache=seq.cache, prefix_batch=pb, use_cache=True, logits_to_keep=1)
        seq.prefilled += n
        if seq.prefilled < len(seq.prompt):
            return None
        seq.cache = [(layer.keys[0], layer.values[0]) for layer in seq.cache.layers]
        return out.logits[:, -1]

    def _join(self, seq: Seq, token: int) -> None:
        slot, t = len(self.rows), len(seq.prompt)
        if not self.kv:  # first row ever: the buffers take the shapes of its cache ([heads, t, dim] per layer)
            self.kv = [tuple(torch.zeros(self.max_rows, x.shape[0], 64, x.shape[2], dtype=x.dtype, device=self.device)
                             for x in layer) for layer in seq.cache]
        self._reserve(t + 1)
        for (k, v), (keys, values) in zip(self.kv, seq.cache):
            k[slot, :, :t] = keys
            v[slot, :, :t] = values
        self._set_prefix(slot, seq.prefix)
        self.lens[slot] = t
        self.rows.append(seq)
        seq.cache, seq.last, seq.generated = None, token, 1

    def _reserve(self, width: int) -> None:
        """Make the KV buffers at least ``width`` columns wide (doubling)."""
        capacity = self.kv[0][0].shape[2]
        if width <= capacity:
            return
        new = max(width, 2 * capacity)
        grown = []
        for k, v in self.kv:
            k2 = k.new_zeros(k.shape[0], k.shape[1], new, k.shape[3])
            v2 = v.new_zeros(v.shape[0], v.shape[1], new, v.shape[3])
            k2[:, :, :capacity], v2[:, :, :capacity] = k, v
            grown.append((k2, v2))
        self.kv = grown

    def _set_prefix(self, slot: int, prefix: Prefix | None) -> None:
        if prefix is None:
            self.plen[slot] = 0
            self.pmask[slot] = False
            return
        kv = prefix.kv["self"].to(self.device, self.dtype)  # [layers, 2, heads, length, dim]
        length = kv.shape[3]
        if self.pk is None or self.pk.shape[3] < length:  # grow the prefix buffers
            layers, _, heads, _, dim = kv.shape
            old = 0 if self.pk is None else self.pk.shape[3]
            pk = torch.zeros(layers, self.max_rows, heads, max(length, 2 * old), dim, dtype=self.dtype, device=self.device)
            pv = torch.zeros_like(pk)
            mask = torch.zeros(self.max_rows, pk.shape[3], dtype=torch.bool, device=self.device)
            if old:
                pk[:, :, :, :old], pv[:, :, :, :old], mask[:, :old] = self.pk, self.pv, self.pmask
            self.pk, self.pv, self.pmask = pk, pv, mask
        self.pk[:, slot, :, :length] = kv[:, 0]
        self.pv[:, slot, :, :length] = kv[:, 1]
        self.pmask[slot] = False
        self.pmask[slot, :length] = True
        self.plen[slot] = length

    def _prefix_batch(self, a: int, b: int) -> PrefixBatch | None:
        width = max(self.plen[a:b])
        if width == 0:
            return None
        # an infix is seen by every query after its separator: all decoding steps are after it
        kd, vd = self.head_dims  # keys and values may differ in width (MLA); stored at the larger
        kv = [(self.pk[i, a:b, :, :width, :kd], self.pv[i, a:b, :, :width, :vd]) for i in range(self.pk.shape[0])]
        return PrefixBatch(kv={"self": kv}, mask={"self": self.pmask[a:b, :width]})

    # -- decoding ------------------------------------------------------------------------------
    def _decode_isolated(self, a: int, b: int) -> list:
        """Decode slots a:b; if the step raises, each row again alone, so only failing rows fail."""
        try:
            return self._decode(a, b)
        except Exception as e:
            if b - a == 1:
                log.error("decoding step of a row failed", exc_info=e)
                return [(self.rows[a], e, None)]
            log.warning("decoding step of %d rows failed (%s: %s); running its rows one by one", b - a,
                        type(e).__name__, e)
        return [event for i in range(a, b) for event in self._decode_isolated(i, i + 1)]

    @torch.no_grad()
    def _decode(self, a: int, b: int) -> list:
        rows = self.rows[a:b]
        lens = self.lens[a:b].clone()  # each row's new token goes to this column (= its position)
        width = int(lens.max()) + 1
        self._reserve(width)
        mask = torch.arange(width, device=self.device)[None, :] <= lens[:, None]
        ids = torch.tensor([[s.last] for s in rows], device=self.device)
        cache = _SlotCache(self, a, b, lens, width)
        out = self.model(input_ids=ids, attention_mask=mask[:, None, None, :], position_ids=lens[:, None], cache=cache,
                         prefix_batch=self._prefix_batch(a, b), use_cache=True)
        self.lens[a:b] = lens + 1
        events = []
        for seq, (token, logprob) in zip(rows, self._choose(rows, out.logits[:, -1])):
            if isinstance(token, BaseException):
                events.append((seq, token, None))
                continue
            seq.last = token
            seq.generated += 1
            events.append((seq, token, logprob))
        return events

    def _choose(self, rows: list[Seq], logits: torch.Tensor) -> list[tuple]:
        """Each row's next token (and its logprob entry), as generate() would choose it alone:
        argmax of the float32 logits, or its processors then a draw from its own generator. An
        exception in place of a token fails that row only."""
        logits = logits.float()
        raw = logits
        if any(s.generated < s.min_new_tokens for s in rows):  # as generate's MinNewTokensLengthLogitsProcessor
            logits = logits.clone()
            for i, seq in enumerate(rows):
                if seq.generated < seq.min_new_tokens:
                    logits[i, self.eos] = float("-inf")
        groups: dict = {}
        for i, seq in enumerate(rows):  # rows with the same settings are processed together
            groups.setdefault((seq.temperature, seq.top_p) if seq.do_sample else None, []).append(i)
        tokens: list = [None] * len(rows)
        for key, idx in groups.items():
            try:
                picked = (logits[idx].argmax(-1).tolist() if key is None
                          else self._sample([rows[i] for i in idx], logits[idx]))
            except Exception as e:
                if len(idx) > 1:
                    picked = [self._choose([rows[i]], logits[i : i + 1])[0][0] for i in idx]
                else:
                    log.error("choosing the next token of a row failed", exc_info=e)
                    picked = [e]
            for i, token in zip(idx, picked):
                tokens[i] = token
        out = []
        for i, (seq, token) in enumerate(zip(rows, tokens)):
            logprob = None
            if seq.logprobs is not None and not isinstance(token, BaseException):
                chosen, top = token_logprobs_at(raw[i : i + 1], torch.tensor([token]), seq.logprobs)
                logprob = (chosen[0], top[0])
            out.append((token, logprob))
        return out

    def _sample(self, rows: list[Seq], scores: torch.Tensor) -> list:
        """Rows of the same settings: generate()'s processors for them (temperature, top-k, top-p, in
        that order; after top-k only its candidates are kept, which is all the later ones can
        keep), then one draw per row from the row's own generator (inverse CDF)."""
        ids = None
        for processor in self.processors(True, rows[0].temperature, rows[0].top_p):
            if isinstance(processor, TopKLogitsWarper) and processor.top_k < scores.shape[-1]:
                scores, ids = scores.topk(processor.top_k, dim=-1)
            else:
                scores = processor(None, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(-1)
        picked = []
        for i, seq in enumerate(rows):
            total = cdf[i, -1]
            if not bool(torch.isfinite(total)) or float(total) <= 0:
                picked.append(ValueError("the next-token probabilities hold NaN or infinite values"))
                continue
            u = torch.rand((), generator=seq.generator, device=cdf.device) * total
            j = min(int(torch.searchsorted(cdf[i], u, right=True)), cdf.shape[1] - 1)
            picked.append(j if ids is None else int(ids[i, j]))
        return picked
