"""Benchmark 2 of issue 6: decoding speed (tokens/s) with a prefix vs without, and vs PEFT.

What is measured: batched decoding of the first ``--n`` unique E2E test sources (reader order;
``read_task("e2e", "test")``), ``--batch-size`` rows per ``generate`` call, greedy and beam search
(``--num-beams``, default 5), for these cases:

* ``ours/L{L}``: ``prefixtune.generate(model, tok, sources, prefixes=prefix, batch_size=...)`` with
  one prefix of length L for all rows (a random-init ``PrefixTuner(...).export()``: speed does not
  depend on what the prefix learned; default lengths 10 and 200).
* ``ours/none``: the same call with ``prefixes=None`` (our attention hook, no prefix).
* ``base``: a separate, untouched copy of the base model (transformers' own attention) through
  ``model.generate``; the reference for "prefix / base".
* ``peft/L{L}``: PEFT's prefix tuning (``PrefixTuningConfig(num_virtual_tokens=L,
  prefix_projection=True, encoder_hidden_size=512)``, random init) through ``PeftModel.generate``.

Every timed call does the same work: tokenise the sources with ``template.encode``, sort them by
length, cut batches, left-pad (``collate_prompts``), generate, decode the text (``base`` and
``peft`` replicate exactly what ``prefixtune.generate`` does around ``model.generate``).

Token counting: for each returned sequence (the best beam; ``num_return_sequences=1``), the new
token ids after the prompt are counted up to and including the first EOS; the padding after it
is not counted. Beam search computes ``num_beams`` hypotheses per row, but only the returned
sequence's tokens count: tokens/s is the user-visible output rate. With ``--stop fixed`` (the
default) generation runs with ``min_new_tokens = max_new_tokens``, so EOS cannot end a row early and
every case produces exactly ``n * max_new_tokens`` tokens: the ratios then compare the cost per
token, not how long random prefixes make the outputs. ``--stop eos`` lets EOS end rows as usual.

Timing: warm-up, then interleaved rounds (every case once per round, order rotated), median
seconds per case; tokens/s = tokens / median seconds. Ratios (of medians, same process):
ours/base, ours/none, ours/PEFT, L_max/L_min, PEFT/base; "paired" = median of per-round ratios.

PEFT check: with PEFT 0.21 on transformers 5.x, ``PeftModel.generate`` does not use the prefix
(transformers 5 passes the cache as ``cache``, PEFT injects its prefix as ``past_key_values``).
For every length, outside timing, the raw logits of PEFT's greedy ``generate`` on unpadded
one-row batches are compared with the base model's (equal = prefix not applied) and with PEFT's
own forward pass (which does apply the prefix); the JSON reports the differences (also for a
left-padded batch, where PEFT's widened mask changes the logits without applying the prefix)
and a verdict, and ours/PEFT ratios are flagged accordingly. It also counts how often PEFT's
prompt encoder (the MLP producing the prefix) runs during one ``generate``: once per decoding
step, for every row, which is why PEFT's generate slows down with the prefix length although the
prefix is then not used.

Example (full settings): ``python benchmarks/decode.py --threads 2``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Decoding tokens/s on E2E test sources: our prefix (two lengths) vs the base model vs "
        "PEFT's prefix generate, greedy and beam search.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=None, help="number of unique E2E test sources (default 32, --quick 4)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per generate call (default 16, --quick 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 60, --quick 8")
    p.add_argument("--lengths", type=C.csv_ints, default=None, help="our/PEFT prefix lengths (default 10,200; --quick 10)")
    p.add_argument("--modes", type=C.csv_strs, default=["greedy", "beam"], help="greedy,beam (default both)")
    p.add_argument("--num-beams", type=int, default=5, help="beams for the 'beam' mode (default 5)")
    p.add_argument("--stop", choices=["fixed", "eos"], default="fixed",
                   help="fixed: every row generates exactly max_new_tokens (default); eos: EOS ends rows")
    p.add_argument("--peft-lengths", type=C.csv_ints, default=None,
                   help="prefix lengths for the PEFT cases (default: --lengths; PEFT at 200 is slow)")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT cases")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of all model copies")
    C.add_common_args(p, "results/perf/decode.json")
    args = p.parse_args(argv)
    C.fill_defaults(
        args,
        normal=dict(n=32, batch_size=16, max_new_tokens=60, lengths=[10, 200], repeats=3, warmup=1),
        quick=dict(n=4, batch_size=4, max_new_tokens=8, lengths=[10], repeats=2, warmup=1),
    )
    bad = set(args.modes) - {"greedy", "beam"}
    if bad:
        p.error(f"unknown --modes {sorted(bad)}")
    return args


def count_new_tokens(out, prompt_width: int, eos: int) -> list[int]:
    """Per returned sequence: new tokens up to and including the first EOS (padding after it not counted)."""
    new = out[:, prompt_width:]
    counts = []
    for row in new.tolist():
        counts.append(row.index(eos) + 1 if eos in row else len(row))
    return counts


class Recorder:
    """Wraps ``model.generate`` (instance attribute) to keep each call's output ids for counting."""

    def __init__(self, model, eos: int):
        self.counts: list[int] = []
        self.eos = eos
        original = model.generate

        def generate(*a, **kw):
            out = original(*a, **kw)
            ids = kw.get("input_ids", a[0] if a else None)
            if ids is not None and not isinstance(out, dict):
                self.counts.extend(count_new_tokens(out, ids.shape[1], eos))
            return out

        model.generate = generate

    def take(self) -> list[int]:
        counts, self.counts = self.counts, []
        return counts


def hf_style_generate(generate_fn, model, tok, sources, batch_size, kwargs, eos, pad):
    """What prefixtune.generate does around model.generate, for a model without our hook."""
    from prefixtune.template import collate_prompts, encode

    prompts = [encode(model, tok, s).prompt for s in sources]
    order = sorted(range(len(sources)), key=lambda i: len(prompts[i]))
    counts, texts = [], [None] * len(sources)
    for k in range(0, len(order), batch_size):
        rows = order[k : k + batch_size]
        batch = collate_prompts(model, [prompts[i] for i in rows], pad)
        out = generate_fn(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        counts.extend(count_new_tokens(out, batch["input_ids"].shape[1], eos))
        for j, t in zip(rows, tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)):
            texts[j] = t.strip()
    return counts, texts


def _compare_generate(torch, pm, base, batch, kwargs, steps: int) -> dict:
    kw = {k: v for k, v in kwargs.items() if k not in ("num_beams", "min_new_tokens")}
    kw.update(max_new_tokens=steps, num_beams=1, output_logits=True, return_dict_in_generate=True)
    encoder_calls = []
    hook = pm.prompt_encoder[pm.active_adapter].register_forward_hook(
        lambda mod, inp, out: encoder_calls.append(list(inp[0].shape)))
    try:
        with torch.no_grad():
            g_peft = pm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    finally:
        hook.remove()
    with torch.no_grad():
        g_base = base.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
        fwd_peft = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, -1]
        fwd_base = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, -1]
    width = batch["input_ids"].shape[1]
    first = g_peft.logits[0].float()  # raw logits (scores would carry -inf from logits processors)
    per_step = [float((a.float() - b.float()).abs().max()) for a, b in zip(g_peft.logits, g_base.logits)]
    seq_peft, seq_base = g_peft.sequences[:, width:], g_base.sequences[:, width:]
    return {
        "rows": int(batch["input_ids"].shape[0]),
        "prompt_encoder_calls_in_generate": len(encoder_calls),
        "prompt_encoder_input_shapes": encoder_calls[:2],
        "first_step_max_abs_diff_vs_base_generate": per_step[0],
        "per_step_max_abs_diff_vs_base_generate": per_step,
        "first_step_max_abs_diff_vs_peft_forward": float((first - fwd_peft.float()).abs().max()),
        "peft_forward_vs_base_forward_max_abs_diff": float((fwd_peft.float() - fwd_base.float()).abs().max()),
        "first_token_equal_base_fraction": float((first.argmax(-1) == fwd_base.argmax(-1)).float().mean()),
        "first_token_equal_peft_forward_fraction": float((first.argmax(-1) == fwd_peft.argmax(-1)).float().mean()),
        "sequences_equal_base": bool(torch.equal(seq_peft, seq_base)),
        "token_agreement_with_base": float((seq_peft == seq_base).float().mean()),
    }


def peft_check(torch, pm, base, singles: list[dict], padded: dict, kwargs, steps: int = 8) -> dict:
    """Does PeftModel.generate apply the prefix? Greedy, raw first-step logits compared with the base
    model's generate and with PEFT's own forward pass (which does use the prefix).

    The verdict rests on unpadded one-row batches (``singles``), where positions and masks cannot
    differ: identical logits to the base model = prefix not applied. The left-padded batch
    (``padded``) is reported too: there PEFT widens the attention mask by num_virtual_tokens
    columns that no key fills, so the logits also differ from the base model's without the
    prefix being applied."""
    rows = [_compare_generate(torch, pm, base, b, kwargs, steps) for b in singles]
    prefix_matters = all(r["peft_forward_vs_base_forward_max_abs_diff"] > 1e-3 for r in rows)
    same_as_base = all(r["first_step_max_abs_diff_vs_base_generate"] < 1e-3 for r in rows)
    applied = all(r["first_step_max_abs_diff_vs_peft_forward"] < 1e-3 for r in rows)
    if not prefix_matters:
        verdict, flag = "undetermined (PEFT's prefix does not change its forward logits)", None
    elif same_as_base:
        verdict, flag = "prefix NOT applied: generate's logits equal the base model's (one-row batches)", False
    elif applied:
        verdict, flag = "prefix applied: generate's first-step logits equal PEFT's forward", True
    else:
        verdict, flag = "unclear: generate matches neither the base model nor PEFT's forward", None
    return {
        "steps": steps,
        "single_rows": rows,
        "padded_batch": _compare_generate(torch, pm, base, padded, kwargs, steps),
        "prefix_applied": flag,
        "verdict": verdict,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    C.quiet()
    threads = C.setup_threads(args.threads)
    load_start = os.getloadavg()
    import torch

    import prefixtune
    from prefixtune.data import read_task
    from prefixtune.template import collate_prompts, encode, special_ids

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    t0 = time.perf_counter()
    ours_model, tok = C.load_model(args.model, dtype)
    base_model, _ = C.load_model(args.model, dtype)
    _, eos, pad = special_ids(tok)
    seen, sources = set(), []
    for e in read_task("e2e", "test"):
        if e.source not in seen:
            seen.add(e.source)
            sources.append(e.source)
    sources = sources[: args.n]
    if len(sources) < args.n:
        print(f"note: only {len(sources)} unique test sources", flush=True)

    prefixes = {}
    for length in args.lengths:
        torch.manual_seed(args.seed)
        tuner = prefixtune.PrefixTuner(ours_model, prefixtune.PrefixConfig(length=length))
        prefixes[length] = tuner.export()
        del tuner
    ours_model.eval()
    recorder = Recorder(ours_model, eos)

    peft_models = {}
    if not args.no_peft:
        from peft import PrefixTuningConfig, get_peft_model

        for length in args.peft_lengths or args.lengths:
            m, _ = C.load_model(args.model, dtype)
            torch.manual_seed(args.seed)
            pm = get_peft_model(m, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length,
                                                      prefix_projection=True, encoder_hidden_size=512))
            pm.eval()
            peft_models[length] = pm
    print(f"decode: models and prefixes ready in {time.perf_counter() - t0:.1f}s; {threads} threads", flush=True)

    def gen_kwargs(mode):
        kw = dict(do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                  num_beams=args.num_beams if mode == "beam" else 1)
        if args.stop == "fixed":
            kw["min_new_tokens"] = args.max_new_tokens
        return kw

    tokens: dict[str, list[int]] = {}
    approximate: set[str] = set()  # cases whose tokens could not be counted from the output ids
    outputs: dict[str, list[str]] = {}

    def ours_case(name, prefix, kw):
        def run():
            texts = prefixtune.generate(ours_model, tok, sources, prefixes=prefix, batch_size=args.batch_size, **kw)
            counts = recorder.take()
            if len(counts) != len(sources):  # prefixtune.generate no longer calls model.generate(input_ids=...)
                approximate.add(name)
                counts = [len(tok(t, add_special_tokens=False).input_ids) + 1 for t in texts]  # + EOS
                if args.stop == "fixed":
                    counts = [args.max_new_tokens] * len(sources)
            tokens.setdefault(name, []).append(sum(counts))
            outputs.setdefault(name, texts)
        return run

    def hf_case(name, generate_fn, model, kw):
        def run():
            with torch.no_grad():
                counts, texts = hf_style_generate(generate_fn, model, tok, sources, args.batch_size, kw, eos, pad)
            tokens.setdefault(name, []).append(sum(counts))
            outputs.setdefault(name, texts)
        return run

    cases = {}
    for mode in args.modes:
        kw = gen_kwargs(mode)
        cases[f"{mode}/base"] = hf_case(f"{mode}/base", base_model.generate, base_model, kw)
        cases[f"{mode}/ours/none"] = ours_case(f"{mode}/ours/none", None, kw)
        for length in args.lengths:
            cases[f"{mode}/ours/L{length}"] = ours_case(f"{mode}/ours/L{length}", prefixes[length], kw)
            if length in peft_models:
                pm = peft_models[length]
                cases[f"{mode}/peft/L{length}"] = hf_case(f"{mode}/peft/L{length}", pm.generate, base_model, kw)
    times = C.interleaved(cases, args.repeats, args.warmup)

    # PEFT check (outside timing): first batch as generate would build it
    checks = {}
    if peft_models:
        prompts = sorted((encode(base_model, tok, s).prompt for s in sources), key=len)[: args.batch_size]
        padded = collate_prompts(base_model, prompts, pad)
        singles = [collate_prompts(base_model, [p], pad) for p in prompts[:4]]
        for length, pm in peft_models.items():
            checks[f"L{length}"] = peft_check(torch, pm, base_model, singles, padded, gen_kwargs("greedy"))
            print(f"PEFT generate check, L={length}: {checks[f'L{length}']['verdict']}", flush=True)

    results = {}
    for name in cases:
        s = C.summary(times[name])
        tok_count = tokens[name][0]
        results[name] = {
            "seconds": s,
            "tokens": tok_count,
            "tokens_per_call_all_rounds": tokens[name],
            "tokens_per_second": tok_count / s["median"],
            "mean_new_tokens_per_row": tok_count / len(sources),
        }

    def tps(name):
        return results[name]["tokens_per_second"] if name in results else None

    def paired_tps(a, b):
        if a not in times or b not in times:
            return None
        # (tokens_a / t_a) / (tokens_b / t_b) per round
        return C.paired_ratio([tokens[a][0] / x for x in times[a]], [tokens[b][0] / x for x in times[b]])

    ratios = []
    peft_ok = {k: v["prefix_applied"] for k, v in checks.items()}
    for mode in args.modes:
        for length in args.lengths:
            ours = f"{mode}/ours/L{length}"
            peft = f"{mode}/peft/L{length}"
            ratios.append({
                "mode": mode, "length": length,
                "ours_over_base": C.ratio(tps(ours), tps(f"{mode}/base")),
                "ours_over_ours_none": C.ratio(tps(ours), tps(f"{mode}/ours/none")),
                "ours_over_peft": C.ratio(tps(ours), tps(peft)),
                "peft_over_base": C.ratio(tps(peft), tps(f"{mode}/base")),
                "paired_ours_over_base": paired_tps(ours, f"{mode}/base"),
                "paired_ours_over_peft": paired_tps(ours, peft),
                "peft_prefix_applied": peft_ok.get(f"L{length}"),
            })
        if len(args.lengths) > 1:
            lo, hi = min(args.lengths), max(args.lengths)
            ratios.append({
                "mode": mode, "length": f"{hi} vs {lo}",
                "ours_over_ours_none": None,
                "long_over_short": C.ratio(tps(f"{mode}/ours/L{hi}"), tps(f"{mode}/ours/L{lo}")),
                "paired_long_over_short": paired_tps(f"{mode}/ours/L{hi}", f"{mode}/ours/L{lo}"),
            })
        ratios.append({"mode": mode, "length": "none", "ours_none_over_base": C.ratio(tps(f"{mode}/ours/none"), tps(f"{mode}/base"))})

    print()
    rows = [{"case": n, "median": r["seconds"]["median"], "min": r["seconds"]["min"], "max": r["seconds"]["max"],
             "tokens": r["tokens"], "tps": r["tokens_per_second"]} for n, r in results.items()]
    stop = "exactly max_new_tokens per row" if args.stop == "fixed" else "EOS ends rows"
    table = C.print_table(rows, [("case", "case"), ("median", "median s"), ("min", "min"), ("max", "max"),
                                 ("tokens", "tokens"), ("tps", "tokens/s")],
                          title=f"Decoding {len(sources)} E2E test sources, batch {args.batch_size}, {args.max_new_tokens} "
                                f"new tokens max ({stop}), beams {args.num_beams} in 'beam' mode, {threads} threads, "
                                f"median of {args.repeats}")
    print()
    rrows = []
    for r in ratios:
        rrows.append({
            "mode": r["mode"], "length": r["length"],
            "a": r.get("ours_over_base"), "b": r.get("ours_over_ours_none"), "c": r.get("ours_over_peft"),
            "d": r.get("long_over_short"), "e": r.get("ours_none_over_base"), "f": r.get("peft_over_base"),
            "g": r.get("peft_prefix_applied"),
        })
    table += "\n\n" + C.print_table(rrows, [
        ("mode", "mode"), ("length", "L"), ("a", "ours/base"), ("b", "ours/ours-none"), ("c", "ours/PEFT"),
        ("d", "long/short"), ("e", "ours-none/base"), ("f", "PEFT/base"), ("g", "PEFT prefix applied?"),
    ], title="tokens/s ratios (of medians; issue 6 targets: prefix/base >= 0.9, length 200/10 >= 0.85)")

    same = {}
    for mode in args.modes:
        if f"{mode}/base" in outputs and f"{mode}/ours/none" in outputs:
            same[mode] = outputs[f"{mode}/base"] == outputs[f"{mode}/ours/none"]
    result = {
        "benchmark": "decode",
        "settings": vars(args),
        "environment": {**C.environment(threads), "load_average_start": load_start},
        "n_sources": len(sources),
        "token_counting": "per returned sequence, new tokens after the prompt up to and including the first EOS; "
                          "padding after EOS not counted; beam search counts only the returned (best) sequence",
        "token_count_approximate": sorted(approximate),
        "prefix_lengths": {f"L{k}": p.length for k, p in prefixes.items()},
        "cases": results,
        "ratios": ratios,
        "peft_generate_check": checks,
        "ours_none_text_equals_base": same,
        "sample_outputs": {k: v[:3] for k, v in outputs.items()},
        "table": table,
    }
    path = C.write_json(args.out, result)
    print(f"\nours/none outputs identical to base: {same}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
