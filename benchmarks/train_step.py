"""Benchmark 1 of issue 6: time and peak memory per training step on the embedded SmolLM2.

What is measured, per batch size B (default 8 and 16) and prefix length L (default 10 and 200):

* ``ours``: our prefix-tuning through the public API only, as ``prefixtune train`` runs it:
  ``PrefixTuner(model, PrefixConfig(length=L, mlp_hidden=512))`` (default MLP
  reparameterisation), one step = ``opt.zero_grad(); tuner(**batch, return_logits=False).loss
  .backward(); opt.step()`` with ``torch.optim.AdamW`` over ``tuner.parameters()``. Whatever
  prefix.py does inside (optimisations included) is measured. Float32 base model.
* ``ours_bf16``: the same with the frozen base model loaded in bfloat16 (``--dtype bfloat16``);
  the prefix parameters, their gradients and AdamW state stay float32.
* ``peft``: PEFT's prefix tuning, same length, projection on: ``get_peft_model(model,
  PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=L, prefix_projection=True,
  encoder_hidden_size=512))``; loss = the loss its forward returns given ``labels`` (transformers'
  causal-LM loss: shifted, -100 ignored, mean over target tokens, i.e. the same objective as our
  default ``token_mean``); AdamW over its trainable parameters. Always float32.
* ``ft``: full fine-tuning: every weight trainable, ``model(**batch).loss``, AdamW over all
  parameters. Always float32.
* ``forward``: a float32 forward of the same batch under ``torch.no_grad()`` (no labels, no
  cache): the floor. With ``ours_bf16`` a ``forward_bf16`` case is added for reference, but
  ratios use the float32 forward, as issue 6 defines them.

Every method has its own model copy (PEFT wraps its model, ours switches the attention
implementation, FT changes weights); trainable state is per (method, L) and shared across batch
sizes. The batch is a fixed seeded sample of real E2E training pairs (``read_task("e2e",
"train")``), encoded and right-padded exactly as training does (``template.encode`` +
``collate_train``); batch B is the first B rows of one sample, so batch 8 is part of batch 16.

Timing: warm-up steps, then interleaved rounds (one step of every case per round, order rotated),
median seconds per step. Ratios (ours/ft, ours/peft, ours/forward) are ratios of medians from
this one process; "paired" ratios are the median of per-round ratios.

Memory: each case runs again in a fresh subprocess (see ``_common.py``): peak resident-memory
growth over the loaded model during the first ``--memory-steps`` steps, so it includes
gradients, AdamW state and activations: what training needs on top of the frozen model. The
persistent part (grads + AdamW moments, 12 bytes per trainable parameter) is shown beside it.

Example (full settings): ``python benchmarks/train_step.py --threads 2``
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = ("ours", "ours_bf16", "peft", "ft", "forward")
OURS = ("ours", "ours_bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time and peak memory per optimizer step: our prefix-tuning vs PEFT prefix tuning vs full "
        "fine-tuning vs a no-grad forward (the floor), on the embedded SmolLM2 with real E2E batches.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch-sizes", type=C.csv_ints, default=None, help="comma-separated (default 8,16; --quick 2)")
    p.add_argument("--lengths", type=C.csv_ints, default=None, help="prefix lengths (default 10,200; --quick 10)")
    p.add_argument("--methods", type=C.csv_strs, default=list(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--mlp-hidden", type=int, default=512, help="MLP width for ours and PEFT's encoder_hidden_size")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (irrelevant to speed)")
    p.add_argument("--memory-steps", type=int, default=None, help="steps per memory worker (default 3, --quick 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    C.add_common_args(p, "results/perf/train_step.json")
    args = p.parse_args(argv)
    C.fill_defaults(
        args,
        normal=dict(batch_sizes=[8, 16], lengths=[10, 200], repeats=5, warmup=2, memory_steps=3),
        quick=dict(batch_sizes=[2], lengths=[10], repeats=2, warmup=1, memory_steps=2),
    )
    bad = set(args.methods) - set(METHODS)
    if bad:
        p.error(f"unknown --methods {sorted(bad)}; choose from {METHODS}")
    return args


def case_names(args) -> list[str]:
    names = []
    for b in args.batch_sizes:
        if "forward" in args.methods:
            names.append(f"forward/b{b}")
            if "ours_bf16" in args.methods:
                names.append(f"forward_bf16/b{b}")
        if "ft" in args.methods:
            names.append(f"ft/b{b}")
        for length in args.lengths:
            for ours in OURS:
                if ours in args.methods:
                    names.append(f"{ours}/b{b}/L{length}")
            if "peft" in args.methods:
                names.append(f"peft/b{b}/L{length}")
    return names


def parse_case(name: str) -> dict:
    parts = name.split("/")
    out = {"method": parts[0], "batch": int(parts[1][1:]), "length": None}
    if len(parts) > 2:
        out["length"] = int(parts[2][1:])
    return out


class Bench:
    """Builds models, batches and step functions lazily (a memory worker builds only its own case)."""

    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.models: dict[str, object] = {}
        self.state: dict[str, dict] = {}
        self.tokenizer = None
        self._batches = None

    def dtype(self, method: str):
        t = self.torch
        return t.bfloat16 if method in ("ours_bf16", "forward_bf16") else t.float32

    def model(self, key: str, method: str):
        if key not in self.models:
            model, tok = C.load_model(self.args.model, self.dtype(method))
            self.tokenizer = self.tokenizer or tok
            self.models[key] = model
        return self.models[key]

    def batches(self) -> dict[int, dict]:
        """The batches, encoded once with the first loaded model's tokenizer (all copies share it)."""
        if self._batches is None:
            from prefixtune.data import read_task
            from prefixtune.template import collate_train, encode, special_ids

            any_model = next(iter(self.models.values()))
            train = read_task("e2e", "train")
            rows = random.Random(self.args.seed).sample(train, max(self.args.batch_sizes))
            pad = special_ids(self.tokenizer)[2]
            encoded = [encode(any_model, self.tokenizer, e.source, e.target) for e in rows]
            self._batches = {}
            for b in self.args.batch_sizes:
                batch = collate_train(any_model, encoded[:b], pad)
                mask, labels = batch["attention_mask"], batch["labels"]
                self._batches[b] = {
                    "tensors": batch,
                    "shape": list(batch["input_ids"].shape),
                    "real_tokens": int(mask.sum()),
                    "target_tokens": int((labels != -100).sum()),
                    "padding_fraction": 1 - float(mask.float().mean()),
                }
        return self._batches

    def build(self, name: str):
        """Return ``(step_fn, info)`` for one case; step_fn() runs one step and returns the loss (or None)."""
        torch = self.torch
        spec = parse_case(name)
        method, b, length = spec["method"], spec["batch"], spec["length"]
        model_key = {"peft": f"peft/L{length}"}.get(method, method)
        model = self.model(model_key, method)
        batch = self.batches()[b]["tensors"]
        info = {**spec, "dtype": str(self.dtype(method)).replace("torch.", "")}
        if method in ("forward", "forward_bf16"):
            model.eval()
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

            def step():
                with torch.no_grad():
                    model(**inputs, use_cache=False)

            info["trainable_parameters"] = 0
            return step, info

        if method in OURS:
            import prefixtune

            key = f"{method}/L{length}"
            if key not in self.state:
                torch.manual_seed(self.args.seed)
                tuner = prefixtune.PrefixTuner(model, prefixtune.PrefixConfig(length=length, mlp_hidden=self.args.mlp_hidden))
                tuner.train()
                params = [p for p in tuner.parameters() if p.requires_grad]
                self.state[key] = {"module": tuner, "opt": torch.optim.AdamW(params, lr=self.args.lr), "params": params}
            st = self.state[key]
            info["prefix_parameter_dtype"] = str(st["params"][0].dtype).replace("torch.", "")

            def forward():
                return st["module"](**batch, return_logits=False).loss

        elif method == "peft":
            from peft import PrefixTuningConfig, get_peft_model

            key = f"peft/L{length}"
            if key not in self.state:
                torch.manual_seed(self.args.seed)
                cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length, prefix_projection=True,
                                         encoder_hidden_size=self.args.mlp_hidden)
                pm = get_peft_model(model, cfg)
                pm.train()
                params = [p for p in pm.parameters() if p.requires_grad]
                self.state[key] = {"module": pm, "opt": torch.optim.AdamW(params, lr=self.args.lr), "params": params}
            st = self.state[key]

            def forward():
                return st["module"](**batch).loss

        elif method == "ft":
            key = "ft"
            if key not in self.state:
                model.requires_grad_(True)
                model.train()
                params = list(model.parameters())
                self.state[key] = {"module": model, "opt": torch.optim.AdamW(params, lr=self.args.lr), "params": params}
            st = self.state[key]

            def forward():
                return st["module"](**batch, use_cache=False).loss

        else:
            raise ValueError(f"unknown case {name}")

        opt = st["opt"]
        info["trainable_parameters"] = sum(p.numel() for p in st["params"])
        info["losses"] = []

        def step():
            opt.zero_grad(set_to_none=True)
            loss = forward()
            loss.backward()
            opt.step()
            value = float(loss.detach())
            if len(info["losses"]) < 50:
                info["losses"].append(value)
            return value

        return step, info


def memory_worker(args) -> None:
    """Run in a fresh process: build one case, then measure its peak RSS growth (see _common)."""
    C.quiet()
    threads = C.setup_threads(args.threads)
    bench = Bench(args)
    step, info = bench.build(args.memory_case)
    C.touch(*bench.models.values(), *(st["module"] for st in bench.state.values()))
    first = C.measure_peak(lambda: [step() for _ in range(args.memory_steps)])
    C.memory_worker_report({
        "case": args.memory_case,
        "threads": threads,
        "steps": args.memory_steps,
        "peak_growth_mb": first["peak_growth_mb"],
        "peak_rss_mb": first["peak_rss_mb"],
        "rss_before_mb": first["rss_before_mb"],
        "method": first["method"],
        "dtype": info["dtype"],
    })


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_case:
        memory_worker(args)
        return {}
    C.quiet()
    threads = C.setup_threads(args.threads)
    load_start = os.getloadavg()
    names = case_names(args)
    print(f"train_step: {len(names)} cases, {args.repeats} rounds after {args.warmup} warm-up, {threads} threads", flush=True)

    t0 = time.perf_counter()
    bench = Bench(args)
    steps, infos = {}, {}
    for name in names:
        steps[name], infos[name] = bench.build(name)
    print(f"  built in {time.perf_counter() - t0:.1f}s", flush=True)
    times = C.interleaved(steps, args.repeats, args.warmup)

    memory = {}
    if not args.no_memory:
        print("memory (one fresh process per case):", flush=True)
        memory = C.run_memory_workers(Path(__file__).resolve(), names, C.strip_memory_flag(sys.argv[1:]))

    cases = {}
    for name in names:
        info = infos[name]
        cases[name] = {**info, "seconds_per_step": C.summary(times[name]), "memory": memory.get(name),
                       "optimizer_state_mb": info["trainable_parameters"] * 12 / 2**20}

    def med(name):
        return cases[name]["seconds_per_step"]["median"] if name in cases else None

    def mem(name):
        m = cases.get(name, {}).get("memory") or {}
        return m.get("peak_growth_mb")

    ratios = []
    for b in args.batch_sizes:
        floor, ft = f"forward/b{b}", f"ft/b{b}"
        for length, method in [(length, method) for length in args.lengths for method in OURS]:
            ours, peft = f"{method}/b{b}/L{length}", f"peft/b{b}/L{length}"
            if ours not in cases:
                continue
            row = {
                "method": method, "batch": b, "length": length,
                "ours_over_ft": C.ratio(med(ours), med(ft)),
                "ours_over_peft": C.ratio(med(ours), med(peft)),
                "ours_over_forward": C.ratio(med(ours), med(floor)),
                "paired_ours_over_ft": C.paired_ratio(times[ours], times[ft]) if ft in times else None,
                "paired_ours_over_peft": C.paired_ratio(times[ours], times[peft]) if peft in times else None,
                "paired_ours_over_forward": C.paired_ratio(times[ours], times[floor]) if floor in times else None,
                "peft_over_ft": C.ratio(med(peft), med(ft)),
                "ft_over_forward": C.ratio(med(ft), med(floor)),
                "memory_ours_over_ft": C.ratio(mem(ours), mem(ft)),
                "memory_ours_over_peft": C.ratio(mem(ours), mem(peft)),
            }
            if method == "ours_bf16":
                row["ours_over_forward_bf16"] = C.ratio(med(ours), med(f"forward_bf16/b{b}"))
            ratios.append(row)

    print()
    rows = []
    for name in names:
        c = cases[name]
        s = c["seconds_per_step"]
        m = c["memory"] or {}
        rows.append({
            "case": name, "dtype": c["dtype"], "params": c["trainable_parameters"], "median": s["median"],
            "min": s["min"], "max": s["max"], "peak": m.get("peak_growth_mb"), "state": c["optimizer_state_mb"],
        })
    shapes = ", ".join(f"b{b}: {v['shape'][0]}x{v['shape'][1]} ({v['target_tokens']} target tokens)"
                       for b, v in bench.batches().items())
    table = C.print_table(rows, [
        ("case", "case"), ("dtype", "base dtype"), ("params", "trainable"), ("median", "median s/step"),
        ("min", "min"), ("max", "max"), ("peak", "peak growth MB"), ("state", "of which grads+AdamW MB"),
    ], title=f"Seconds per optimizer step (median of {args.repeats}), {threads} threads; batches {shapes}")
    print()
    cols = [("method", "ours ="), ("batch", "batch"), ("length", "L"), ("ours_over_ft", "ours/FT"), ("ours_over_peft", "ours/PEFT"),
            ("ours_over_forward", "ours/forward"), ("paired_ours_over_ft", "paired ours/FT"),
            ("paired_ours_over_peft", "paired ours/PEFT"), ("paired_ours_over_forward", "paired ours/fwd"),
            ("memory_ours_over_ft", "mem ours/FT"), ("memory_ours_over_peft", "mem ours/PEFT")]
    if "ours_bf16" in args.methods:
        cols.insert(6, ("ours_over_forward_bf16", "ours/fwd_bf16"))
    table += "\n\n" + C.print_table(ratios, cols, title="Time ratios (of medians; issue 6 targets: FT <= 0.4, PEFT <= 0.7, forward <= 1.6)")

    result = {
        "benchmark": "train_step",
        "settings": {k: v for k, v in vars(args).items() if k != "memory_case"},
        "environment": {**C.environment(threads), "load_average_start": load_start},
        "batches": {str(b): {k: v for k, v in d.items() if k != "tensors"} for b, d in bench.batches().items()},
        "order": names,
        "cases": cases,
        "ratios": ratios,
        "memory_note": "peak_growth_mb: peak RSS growth over the loaded (and fully read) model during the first "
                       "memory_steps steps, each case in a fresh process: gradients, AdamW state, activations and "
                       "allocator overhead. optimizer_state_mb: trainable parameters x 12 bytes (float32 grad + "
                       "exp_avg + exp_avg_sq), the persistent part of that growth. A per-step figure after the "
                       "first steps is not reported: freed memory stays in the allocator, so RSS no longer moves.",
        "table": table,
    }
    path = C.write_json(args.out, result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
