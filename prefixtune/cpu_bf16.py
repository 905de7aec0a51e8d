"""bfloat16 matrix products on CPUs without bfloat16 kernels, computed in float32 at float32's speed.

The experiments (issue 11) train every method under bfloat16 autocast and decode in bfloat16. On a
CPU with AMX or avx512 (what oneDNN needs for its bfloat16 kernels) those products are ~1.7-2x
faster than float32. On one without (an AVX2-only CPU), torch falls back to a kernel ~6x slower
than float32, and a training step under autocast gets 10-17x slower (results/perf/float32_products.json).

The same arithmetic runs at float32's speed: a product of two bfloat16 numbers is exact in float32
(8-bit significands make a 16-bit product), so a float32 matrix product of the bfloat16-rounded
inputs, accumulated in float32 and rounded to bfloat16 at the end, computes what a bfloat16 kernel
computes, up to the order of the summation (as two bfloat16 kernels differ from each other).
Autograd rounds the gradients where autocast would: at the casts' backward. ``Float32Products``
does this for ``F.linear`` (>97% of a short-sequence step's time), matmuls, ``addmm`` and attention
(``F.scaled_dot_product_attention``, up to ~45% of a step at 512 positions; not the kernel's bits,
as its softmax weights stay in float32, but closer to exact); other ops run as they would.

Used where this CPU lacks the kernels (``FLOAT32_PRODUCTS``): training under autocast
(``prefixtune.train.frozen_casts``) and decoding a bfloat16 model (``products``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

BF16 = torch.bfloat16

# True where oneDNN has no bfloat16 kernels on this CPU (tests switch it to test both paths)
FLOAT32_PRODUCTS = not torch.ops.mkldnn._is_mkldnn_bf16_supported()

# False: attention runs in torch's bfloat16 kernel (as before 2026-12-02; for benchmarks)
ATTENTION = True

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_ADDMMS = {torch.addmm, torch.Tensor.addmm}
_SDPA = nn.functional.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class Float32Products(TorchFunctionMode):
    """Inside, every CPU ``F.linear``, matmul, ``addmm`` and ``scaled_dot_product_attention`` that
    would run in bfloat16 (its operands bfloat16, or under CPU bfloat16 autocast) runs in float32 on
    the bfloat16-rounded operands, its result rounded to bfloat16. ``cache``: keep each frozen
    weight's float32 copy (made once, remade if the weight changes) instead of making it at every
    call; the copies live as long as this object."""

    def __init__(self, cache: bool = True):
        super().__init__()
        self.cache = cache
        self.copies: dict[int, tuple[torch.Tensor, tuple, torch.Tensor]] = {}  # frozen weights'
        self.region: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # trained weights' (see _operand)

    def __exit__(self, *exc):
        self.region.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.linear and len(args) >= 2 and _in_bfloat16(args[0], args[1]):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            operands = [self._operand(args[0]), self._operand(args[1]), None if bias is None else self._operand(bias)]
            with torch.autocast("cpu", enabled=False):
                return nn.functional.linear(*operands).to(BF16)
        if func is _SDPA and ATTENTION:
            call = dict(zip(_SDPA_ARGS, args), **kwargs)
            q, k, v = call.pop("query", None), call.pop("key", None), call.pop("value", None)
            if _in_bfloat16(q, k) and _in_bfloat16(q, v):
                # attention too: torch's bfloat16 kernel rounds its softmax weights to bfloat16
                # before the product with the values, this one keeps them in float32 (closer to
                # exact: tests/test_cpu_bf16.py); its backward is ~6x faster than the bfloat16 one
                # at 512 positions (the summarization runs), where it took ~45% of a step
                mask = call.get("attn_mask")
                if isinstance(mask, torch.Tensor) and mask.is_floating_point():
                    call["attn_mask"] = mask.float()  # additive: 0 or a large negative, kept
                with torch.autocast("cpu", enabled=False):
                    return _SDPA(_rounded(q), _rounded(k), _rounded(v), **call).to(BF16)
        if not kwargs and (func in _MATMULS and len(args) == 2 and _in_bfloat16(*args)
                           or func in _ADDMMS and len(args) == 3 and _in_bfloat16(*args[1:]) and _in_bfloat16(*args[:2])):
            operands = list(map(self._operand, args))  # (addmm: GPT-2's Conv1D, bias + input @ weight)
            with torch.autocast("cpu", enabled=False):
                return func(*operands).to(BF16)
        return func(*args, **kwargs)

    def _operand(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` rounded to bfloat16, in float32. A weight that autograd may differentiate is cast once
        per autocast region, as autocast casts it, so that its uses' gradients meet in bfloat16 (each
        use rounds its own at its ``float()``); a frozen one, or any under no_grad, once per version of
        its values where caching."""
        if type(t) is not nn.Parameter:
            return _rounded(t)
        if t.requires_grad and torch.is_grad_enabled():
            if not torch.is_autocast_enabled("cpu"):
                return _rounded(t)
            entry = self.region.get(id(t))
            if entry is None or entry[0] is not t:
                entry = self.region[id(t)] = (t, t.to(BF16))
            return entry[1].float()
        if not self.cache:
            return _rounded(t)
        state = (t._version, t.data_ptr(), t.dtype)
        entry = self.copies.get(id(t))
        if entry is None or entry[0] is not t or entry[1] != state:
            entry = self.copies[id(t)] = (t, state, _rounded(t.detach()))
        return entry[2]


def _in_bfloat16(a, b) -> bool:
    """Whether a product of ``a`` and ``b`` runs in bfloat16 on CPU: both bfloat16, or both float32 /
    bfloat16 under CPU bfloat16 autocast (which casts them)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16:
        return a.dtype in (torch.float32, BF16) and b.dtype in (torch.float32, BF16)
    return a.dtype == b.dtype == BF16


def _rounded(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bfloat16 (as autocast casts it), in float32."""
    return t.to(BF16).float()


def products_kind() -> str:
    """How this machine runs bfloat16 products: ``"native"`` (its own kernels) or ``"float32"``
    (``Float32Products``); the grid's ledger records it with each run."""
    return "float32" if FLOAT32_PRODUCTS else "native"


def products(model) -> contextlib.AbstractContextManager:
    """Float32Products for running a bfloat16 ``model`` on a CPU without bfloat16 kernels, else nothing."""
    weight = next(model.parameters(), None)
    if FLOAT32_PRODUCTS and weight is not None and weight.device.type == "cpu" and weight.dtype == BF16:
        return Float32Products()
    return contextlib.nullcontext()
