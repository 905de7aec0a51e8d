"""Decoding and scoring with any mix of prefixes: each row of a batch may use its own prefix, or none.

Rows are grouped by length (less padding) and run through the standard transformers
``generate``; every generate keyword (num_beams, do_sample, temperature, top_p,
max_new_tokens, ...) passes through. Results come back in input order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import attach, beam, cpu_bf16
from .batch import make_batch
from .files import write_atomic
from .loss import decoder_inputs_from_labels, token_logprobs
from .prefix import Prefix
from .modes import eval_mode
from .template import collate_prompts, collate_train, encode, length_batches, prepend_soft_prompt, prompt_batches, \
    special_ids


# See _contiguous_lm_head_input; False = as before (the switch exists for benchmarks).
CONTIGUOUS_LM_HEAD = True
# Beam search without sampling runs prefixtune.beam.beam_search (prompts run once, final rows leave
# the batch; transformers' outputs in float32); False = transformers' own loop (for tests and benchmarks).
RETIRE_ROWS = True


def _per_row(prefixes, n: int) -> list[Prefix | None]:
    if prefixes is None or isinstance(prefixes, Prefix):
        return [prefixes] * n
    prefixes = list(prefixes)
    if len(prefixes) != n:
        raise ValueError(f"got {len(prefixes)} prefixes for {n} inputs; give one per input, or a single prefix")
    return prefixes


def _prepare(model, prefixes: list[Prefix | None]) -> None:
    attach.enable(model)
    seen = set()
    for p in prefixes:
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            p.check_compatible(model)


@dataclass
class Generation:
    """What :func:`generate` produced for one row with ``return_tokens=True``.

    ``tokens``: the generated ids, up to and including the first EOS (``eos_token_id``; -1: none). ``logprobs`` (when asked):
    per token, log p(token) under the model (its raw logits, before temperature and top-p) and the
    ``logprobs`` most likely tokens with theirs, as ``(logprob, [(id, logprob), ...])``."""

    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


def token_logprobs_at(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[list, list]:
    """``logits`` [rows, vocab], ``tokens`` [rows]: log p of each row's token, and its top-``k`` (id, logp)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None].to(logp.device))[:, 0].tolist()
    if k <= 0:
        return chosen, [[] for _ in chosen]
    top = logp.topk(k, dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]


def generate(
    model,
    tokenizer,
    sources: Sequence[str | list[int]],
    prefixes: Prefix | Sequence[Prefix | None] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    soft_prompt: torch.Tensor | None = None,
    return_tokens: bool = False,
    logprobs: int | None = None,
    **generate_kwargs,
) -> list[str] | list[list[str]] | list[Generation]:
    """Generate a continuation for each source with its own prefix (``prefixes[i]``, or one for all).

    Returns one string per source, or a list of ``num_return_sequences`` strings per source.
    Defaults: greedy (``do_sample=False``) and ``max_new_tokens=100`` unless given.
    A source is text, or a prompt already encoded (token ids, e.g. a rendered chat template).
    ``soft_prompt``: ``[length, hidden]`` input embeddings put before every source (prompt tuning,
    the paper's embedding-only ablation; see prefixtune/baselines/prompt.py).
    ``return_tokens``: a :class:`Generation` per source instead of text; ``logprobs=k`` adds the
    token log-probabilities and the top-k alternatives (not with beam search).
    """
    sources = list(sources)
    results: list = [None] * len(sources)
    for _, rows, outputs in generate_batches(model, tokenizer, sources, prefixes, batch_size, progress, soft_prompt,
                                             return_tokens, logprobs, **generate_kwargs):
        for i, output in zip(rows, outputs):
            results[i] = output
    return results


@torch.no_grad()
def generate_batches(
    model,
    tokenizer,
    sources: Sequence[str | list[int]],
    prefixes: Prefix | Sequence[Prefix | None] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    soft_prompt: torch.Tensor | None = None,
    return_tokens: bool = False,
    logprobs: int | None = None,
    skip: Collection[int] = (),
    seed: int | None = None,
    **generate_kwargs,
) -> Iterator[tuple[int, list[int], list]]:
    """:func:`generate` one batch at a time: yields ``(batch number, source indices, their outputs)``
    as each batch finishes, leaving out the batches numbered in ``skip``. The batches depend only on
    the sources and ``batch_size``, so a caller that kept the finished batches resumes an interrupted
    run with exactly the batches, and so the outputs, of an uninterrupted one (``prefixtune generate``
    does). ``seed``: seed torch with ``seed`` + the batch number before each batch, so that sampled
    outputs do not depend on which batches ran before either."""
    sources = list(sources)
    prefixes = _per_row(prefixes, len(sources))
    _prepare(model, prefixes)
    _, eos, pad = special_ids(tokenizer)
    generate_kwargs.setdefault("do_sample", False)
    if "max_length" not in generate_kwargs:
        generate_kwargs.setdefault("max_new_tokens", 100)
    generate_kwargs.setdefault("eos_token_id", eos)
    generate_kwargs.setdefault("pad_token_id", pad)
    if generate_kwargs.get("num_beams", 1) < 1:
        raise ValueError(f"num_beams must be >= 1, got {generate_kwargs['num_beams']}")
    if generate_kwargs.get("top_p") is not None and not 0 < generate_kwargs["top_p"] <= 1:
        raise ValueError(f"top_p is a probability mass in (0, 1], got {generate_kwargs['top_p']}")
    n_return = generate_kwargs.get("num_return_sequences", 1)
    if return_tokens and n_return != 1:
        raise ValueError("return_tokens=True returns one sequence per source (num_return_sequences=1)")
    if logprobs is not None:
        if not return_tokens or generate_kwargs.get("num_beams", 1) != 1:
            raise ValueError("logprobs need return_tokens=True and num_beams=1")
        generate_kwargs.update(return_dict_in_generate=True, output_logits=True)
    if RETIRE_ROWS and generate_kwargs.get("num_beams", 1) > 1 and not generate_kwargs["do_sample"]:
        generate_kwargs.setdefault("custom_generate", beam.beam_search)
    device = next(model.parameters()).device
    prompts, batches = prompt_batches(model, tokenizer, sources, batch_size)
    todo = [(b, rows) for b, rows in enumerate(batches) if b not in skip]
    head = _contiguous_lm_head_input(model)
    try:
        with eval_mode(model), cpu_bf16.products(model):
            for b, rows in tqdm(todo, desc="generate", disable=not progress, initial=len(batches) - len(todo),
                                total=len(batches)):
                if seed is not None:
                    torch.manual_seed(seed + b)
                batch = {k: v.to(device) for k, v in collate_prompts(model, [prompts[i] for i in rows], pad).items()}
                # decoder-only prompts are left-padded: every row's separator is the last prompt token
                width = batch["input_ids"].shape[1] + (0 if soft_prompt is None else soft_prompt.shape[0])
                prefix_batch = make_batch([prefixes[i] for i in rows], device, separators=[width - 1] * len(rows))
                if soft_prompt is not None:  # generate() then returns the new tokens only
                    batch = prepend_soft_prompt(model, soft_prompt, **batch)
                out = model.generate(**batch, prefix_batch=prefix_batch, **generate_kwargs)
                logits = None
                if logprobs is not None:  # raw logits per step: [rows, steps, vocab]
                    logits, out = torch.stack(out.logits, dim=1), out.sequences
                if not attach.is_seq2seq(model) and "input_ids" in batch:
                    out = out[:, batch["input_ids"].shape[1] :]
                if return_tokens:
                    if attach.is_seq2seq(model):
                        out = out[:, 1:]  # the decoder start token
                    yield b, rows, [_generation(out[j], generate_kwargs["eos_token_id"],
                                                None if logits is None else logits[j], logprobs) for j in range(len(rows))]
                    continue
                texts = [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
                yield b, rows, [texts[j] if n_return == 1 else texts[j * n_return : (j + 1) * n_return]
                                for j in range(len(rows))]
    finally:
        if head is not None:
            head.remove()


class PartialOutputs:
    """The finished batches of a :func:`generate_batches` run, kept in a file beside its output so that
    the same command resumes it after an interruption (``prefixtune generate``).

    Line 1 holds a key of the settings (model weights and dtype, prefixes, soft prompt, sources,
    decoding options, batch size, seed); then one JSON line per finished batch, flushed as it
    finishes. A file of other settings is started over; a torn last line (a killed process) is
    dropped. Resumed outputs equal an uninterrupted run's, since the batches are the same."""

    def __init__(self, path: str | Path, settings):
        self.path, self.done = Path(path), {}
        key = {"key": _digest(settings)}
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        if lines and _loads(lines[0]) == key:
            for line in lines[1:]:
                row = _loads(line)
                if isinstance(row, dict) and {"batch", "rows", "outputs"} <= set(row):
                    self.done[row["batch"]] = (row["rows"], row["outputs"])
        kept = [json.dumps(key)] + [json.dumps({"batch": b, "rows": r, "outputs": o}, ensure_ascii=False)
                                     for b, (r, o) in self.done.items()]
        write_atomic(self.path, "\n".join(kept) + "\n")

    def add(self, batch: int, rows: list[int], outputs: list) -> None:
        self.done[batch] = (rows, outputs)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"batch": batch, "rows": rows, "outputs": outputs}, ensure_ascii=False) + "\n")

    def outputs(self, n: int) -> list:
        """Every source's output, in source order (all ``n`` must be done)."""
        results = [None] * n
        for rows, outputs in self.done.values():
            for i, output in zip(rows, outputs):
                results[i] = output
        return results

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _loads(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _digest(obj) -> str:
    """A hash of what decides the outputs: a model by its weights' fingerprint and dtype, tensors and
    prefixes by their values, anything else by its JSON (or text) form."""
    h = hashlib.sha256()

    def add(x):
        if isinstance(x, torch.nn.Module):
            h.update(f"model {attach.fingerprint(x)} {next(x.parameters()).dtype}".encode())
        elif isinstance(x, torch.Tensor):
            h.update(f"tensor {x.dtype} {tuple(x.shape)}".encode() + x.detach().float().cpu().numpy().tobytes())
        elif isinstance(x, Prefix):
            add(sorted(x.kv.items()))
        elif isinstance(x, (list, tuple)):
            h.update(f"list {len(x)}".encode())
            for item in x:
                add(item)
        elif isinstance(x, dict):  # e.g. generate's keywords (a prefix among them)
            add(sorted(x.items(), key=lambda kv: str(kv[0])))
        else:
            h.update(json.dumps(x, sort_keys=True, default=str).encode())

    add(obj)
    return h.hexdigest()[:16]


def until_eos(row: torch.Tensor, eos) -> list[int]:
    """A generated row's tokens up to and including the first EOS (``eos``: an id or a list of ids;
    -1: generation ignored EOS), without the padding after it."""
    tokens, stops = row.tolist(), set(eos if isinstance(eos, (list, tuple)) else [eos])
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    return tokens if end is None else tokens[: end + 1]


def _generation(row: torch.Tensor, eos, logits: torch.Tensor | None, k: int | None) -> Generation:
    tokens = until_eos(row, eos)
    if logits is None:
        return Generation(tokens)
    chosen, top = token_logprobs_at(logits[: len(tokens)], row[: len(tokens)], k)
    return Generation(tokens, list(zip(chosen, top)))


def _contiguous_lm_head_input(model):
    """On CPU, a bfloat16/float16 LM head given the last position's hidden states (a strided slice,
    what generate's first step passes) runs as a batched matmul that copies the whole head weight
    once per row (16 x 57 MB for SmolLM2 at batch 16: half of a 32-token decode). A contiguous input
    takes the plain matmul. Returns the hook's handle (None when not needed)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not CONTIGUOUS_LM_HEAD or weight is None or weight.device.type != "cpu" or weight.dtype == torch.float32:
        return None
    return head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


@torch.no_grad()
def score(
    model,
    tokenizer,
    sources: Sequence[str],
    targets: Sequence[str],
    prefixes: Prefix | Sequence[Prefix | None] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    soft_prompt: torch.Tensor | None = None,
) -> list[float]:
    """log p(target | source, prefix) per row: the sum of the target tokens' log-probabilities (EOS
    included). ``soft_prompt``: as in :func:`generate`."""
    sources, targets = list(sources), list(targets)
    if len(sources) != len(targets):
        raise ValueError(f"got {len(sources)} sources but {len(targets)} targets")
    prefixes = _per_row(prefixes, len(sources))
    _prepare(model, prefixes)
    _, _, pad = special_ids(tokenizer)
    device = next(model.parameters()).device
    encoded = [encode(model, tokenizer, s, t) for s, t in zip(sources, targets)]
    results = [0.0] * len(sources)
    seq2seq = attach.is_seq2seq(model)
    with eval_mode(model), cpu_bf16.products(model):
        for rows in tqdm(length_batches([len(e.prompt) + len(e.target) for e in encoded], batch_size), desc="score",
                         disable=not progress):
            batch = {k: v.to(device) for k, v in collate_train(model, [encoded[i] for i in rows], pad).items()}
            labels = batch.pop("labels")
            if seq2seq:
                batch["decoder_input_ids"] = decoder_inputs_from_labels(model, labels)
            shift = 0 if soft_prompt is None else soft_prompt.shape[0]
            prefix_batch = make_batch([prefixes[i] for i in rows], device,
                                      separators=[shift + len(encoded[i].prompt) - 1 for i in rows])
            if soft_prompt is not None:
                batch = prepend_soft_prompt(model, soft_prompt, labels=labels, **batch)
                labels = batch.pop("labels")
            logits = model(**batch, prefix_batch=prefix_batch, use_cache=False).logits
            logp, _ = token_logprobs(logits, labels, shift=not seq2seq)
            for j, i in enumerate(rows):
                results[i] = float(logp[j].sum())
    return results
