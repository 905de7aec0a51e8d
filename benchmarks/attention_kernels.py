"""Issue 16: the prefixed attention of a training step on CPU, forward + backward, by implementation.

Shapes of SmolLM2 (9 query heads, 3 key/value heads, head size 64) for one layer: ``--batch`` rows of
``--tokens`` tokens attend causally to themselves and to a prefix of ``--length`` positions shared by
the batch. Inputs in bfloat16 (a bf16 base model); the loss is the sum of squares of the output.

* ``flash_fp32``: torch's CPU flash kernel on float32 copies of q, k, v (what prefixtune does now
  when training a low-precision model on CPU, ``attach.CPU_FP32_BACKWARD``).
* ``flash_bf16``: the same kernel in bfloat16 (before issue 16).
* ``split_fp32`` / ``split_bf16``: attention written as matmuls, the prefix scores as one GEMM per
  key/value head for the whole batch (the prefix is shared), one softmax over prefix and tokens.
  (the many-query form of ``attach._decode_step_attention``, which is single-query only).

Reports the median milliseconds per call and each one's error against float64 (output, and the
gradient of q and of the prefix keys, relative to their largest value).

Example: ``python benchmarks/attention_kernels.py --threads 2 --batch 8 --length 200 --tokens 64``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HEADS, KV_HEADS, DIM = 9, 3, 64


def rel(a, b) -> float:
    """Largest difference of ``a`` from the float64 reference ``b``, relative to ``b``'s largest value."""
    return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=200, help="prefix positions")
    p.add_argument("--tokens", type=int, default=64, help="tokens per row")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/perf/attention_kernels.json")
    args = p.parse_args(argv)
    threads = C.setup_threads(args.threads)

    import torch
    import torch.nn.functional as F

    B, L, T, g = args.batch, args.length, args.tokens, HEADS // KV_HEADS
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def flash(q, pk, pv, k, v, dtype):
        K, V = torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)
        mask = torch.cat([torch.ones(T, L, dtype=torch.bool), causal], 1)[None, None].expand(B, 1, T, L + T)
        out = F.scaled_dot_product_attention(q.to(dtype), K.to(dtype), V.to(dtype), attn_mask=mask, enable_gqa=True)
        return out.to(q.dtype)

    def split(q, pk, pv, k, v, dtype):
        qf = q.to(dtype).reshape(B, KV_HEADS, g * T, DIM) * DIM ** -0.5
        scores_prefix = torch.einsum("bkqd,kld->bkql", qf, pk[0].to(dtype))
        scores_own = (qf @ k.to(dtype).transpose(-1, -2)).view(B, KV_HEADS, g, T, T)
        scores_own = scores_own.masked_fill(~causal, float("-inf")).view(B, KV_HEADS, g * T, T)
        probs = torch.cat([scores_prefix, scores_own], -1).float().softmax(-1).to(dtype)
        out = torch.einsum("bkql,kld->bkqd", probs[..., :L], pv[0].to(dtype)) + probs[..., L:] @ v.to(dtype)
        return out.reshape(B, HEADS, T, DIM).to(q.dtype)

    impls = {"flash_fp32": (flash, torch.float32), "flash_bf16": (flash, torch.bfloat16),
             "split_fp32": (split, torch.float32), "split_bf16": (split, torch.bfloat16)}
    torch.manual_seed(0)
    shapes = [(B, HEADS, T, DIM), (1, KV_HEADS, L, DIM), (1, KV_HEADS, L, DIM), (B, KV_HEADS, T, DIM), (B, KV_HEADS, T, DIM)]
    inputs = [torch.randn(s, dtype=torch.bfloat16, requires_grad=True) for s in shapes]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    ref = flash(*exact, torch.float64)
    ref.square().sum().backward()
    errors = {}
    for name, (fn, dtype) in impls.items():
        for t in inputs:
            t.grad = None
        out = fn(*inputs, dtype)
        out.float().square().sum().backward()
        errors[name] = {"output": rel(out, ref), "grad_q": rel(inputs[0].grad, exact[0].grad),
                        "grad_prefix_keys": rel(inputs[1].grad, exact[1].grad)}
    # the error pass above was each implementation's warm-up
    cases = {name: (lambda fn=fn, dtype=dtype: fn(*inputs, dtype).float().square().sum().backward())
             for name, (fn, dtype) in impls.items()}
    times = C.interleaved(cases, args.repeats, warmup=0, log=None)
    rows = [{"case": n, "ms": 1000 * C.summary(t)["median"], **{f"err_{k}": v for k, v in errors[n].items()}}
            for n, t in times.items()]
    table = C.print_table(rows, [("case", "implementation"), ("ms", "ms fwd+bwd"), ("err_output", "output err"),
                                 ("err_grad_q", "dq err"), ("err_grad_prefix_keys", "d prefix-k err")],
                          title=f"one layer's prefixed attention, b{B} L{L} T{T}, {threads} threads")
    result = {"benchmark": "attention_kernels", "settings": vars(args), "environment": C.environment(threads),
              "times": times, "rows": rows, "table": table}
    print(f"wrote {C.write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
