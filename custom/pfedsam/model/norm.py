"""LayerNorm and softmax whose gradients do not depend on the number of CPU threads.

PyTorch's CPU LayerNorm backward sums the weight and bias gradients over the rows with one
partial sum per thread, so the same step gives different gradients with 1 and 2 threads
(float32: a few ulp; bf16 autocast: enough to move a report's 4th decimal). The simulator
gives each client ``cores // clients`` threads, so ``-t 1`` and ``-t 2`` trained apart. Here
the normalization runs without affine (its input gradient is per row, thread-invariant) and
the affine's parameter gradients are summed on one thread: the forward pass is the same up
to the rounding of the unfused affine. Cost measured (before the elementwise product was
moved out of the one-thread section) on 2 threads, LiteMedSAM, batch 4, bf16:
local step level (0.596 against 0.599 s), global step 0.489 against 0.420 s (medians of 3,
noisy; docs/results.md).

PyTorch's CPU softmax backward over short rows (TinyViT's 49-token windows) also depends on
the thread count (the rows a thread takes decide which are vectorized): ``softmax`` here
computes the same gradient, ``y * (g - sum(g * y))``, with one row per reduction.

Under bf16 autocast torch runs every LayerNorm in float32: a bf16 input is copied to float32
and the output handed back in float32, which the next linear layer casts again. Over the mask
decoder's image tokens those copies and float32 passes cost more than the normalization, so a
LayerNorm whose input already is in autocast's dtype stays in it here (statistics in float32).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def _one_cpu_thread(t: torch.Tensor) -> Iterator[None]:
    """Reductions inside run serially on a CPU (a fixed summation order); no-op on other devices."""
    threads = torch.get_num_threads()
    serial = t.device.type == "cpu" and threads > 1
    if serial:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if serial:
            torch.set_num_threads(threads)


def _affine_grads(g: torch.Tensor, gx_hat: torch.Tensor | None, need_b: bool,
                  dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight and bias gradients of an affine over rows ``(N, C)``: the row sums of ``gx_hat`` (the
    gradient times the normalized input; None when no weight gradient is needed) and of ``g``,
    on one thread: only these sums over rows need the fixed order."""
    with _one_cpu_thread(g):
        return (gx_hat.sum(0).to(dtype) if gx_hat is not None else None,
                g.sum(0).to(dtype) if need_b else None)


class _Affine(torch.autograd.Function):
    """``x * weight + bias`` over the last dimension; parameter gradients summed on one thread."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.addcmul(bias, x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = grad * weight if need_x else None
        gw = gb = None
        if need_w or need_b:
            g = grad.reshape(-1, grad.shape[-1])
            gx_hat = g * x.reshape(-1, x.shape[-1]) if need_w else None  # per element: any thread count
            gw, gb = _affine_grads(g, gx_hat, need_b, weight.dtype)
        return gx, gw, gb


class _Softmax(torch.autograd.Function):
    """``softmax`` over the last dimension; its backward reduces each row in one fixed order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return y * (grad - (grad * y).sum(-1, keepdim=True))


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension with a thread-invariant input gradient (the plain one when
    no gradient is needed, e.g. in an export). Under autocast it runs in float32, as torch's does."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.softmax(dim=-1)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _Softmax.apply(x.float())
    return _Softmax.apply(x)


class _ReducedLayerNorm(torch.autograd.Function):
    """LayerNorm over the last dimension of a bf16 (or float16) input, returned in that dtype.

    torch's mixed-type CPU kernel (float32 weight and bias) does it in one pass with float32
    statistics and one rounding, whether or not a gradient is needed (so training and scoring
    compute the same function). The input gradient is torch's per-row kernel; the weight and
    bias gradients are summed in float32 on one thread.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        out, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mean, rstd, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.to(x.dtype).contiguous()
        gx = gw = gb = None
        if need_x:  # per row: the same for any thread count
            gx = torch.ops.aten.native_layer_norm_backward(
                grad, x, (x.shape[-1],), mean, rstd, weight, None, [True, False, False])[0]
        if need_w or need_b:
            # Per element, on every thread: the float32 copy of the gradient and, for the weight,
            # the normalized input recomputed from the kept statistics, times the gradient.
            c = x.shape[-1]
            g = grad.reshape(-1, c).float()
            gx_hat = None
            if need_w:  # (x - mean) * rstd * g, in place on one float32 copy (a mixed-dtype addcmul was 10x slower)
                gx_hat = x.reshape(-1, c).float().sub_(mean.reshape(-1, 1)).mul_(rstd.reshape(-1, 1)).mul_(g)
            gw, gb = _affine_grads(g, gx_hat, need_b, weight.dtype)
        return gx, gw, gb, None


def layer_norm(x: torch.Tensor, shape: tuple[int, ...], weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension with thread-invariant parameter gradients.

    Under autocast on a CPU, an input already in autocast's dtype is normalized in that dtype
    and returned in it (torch's autocast would return float32); any other input, and every input
    on CUDA (whose kernel takes no float32 weight with a bf16 input), follows torch.

    Arguments:
      x: input ``(..., C)``.
      shape: ``(C,)``: only the last dimension is normalized.
      weight, bias: the affine ``(C,)``, or None for none.
      eps: added to the variance.
    """
    device = x.device.type
    # the reduced path needs torch's mixed-dtype CPU kernel; CUDA's wants one dtype and follows autocast
    if (device == "cpu" and weight is not None and bias is not None and len(shape) == 1
            and torch.is_autocast_enabled(device)
            and x.dtype == torch.get_autocast_dtype(device) and x.dtype != torch.float32):
        with torch.autocast(device, enabled=False):
            return _ReducedLayerNorm.apply(x.contiguous(), weight, bias, eps)
    if weight is None or bias is None or not (weight.requires_grad or bias.requires_grad):
        return F.layer_norm(x, shape, weight, bias, eps)  # no parameter gradient to sum
    if len(shape) != 1:
        raise ValueError(f"layer_norm: only the last dimension can be normalized, got shape {shape}")
    return _Affine.apply(F.layer_norm(x, shape, None, None, eps), weight, bias)


class ThreadInvariantLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension whose parameter gradients are summed on one thread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def make_thread_invariant(module: nn.Module) -> int:
    """Turn every affine ``nn.LayerNorm`` over one dimension in ``module`` into a
    ``ThreadInvariantLayerNorm`` in place (same parameters and state-dict names); returns how many.
    """
    n = 0
    for m in module.modules():
        if type(m) is nn.LayerNorm and m.elementwise_affine and len(m.normalized_shape) == 1 \
                and getattr(m, "bias", None) is not None:
            m.__class__ = ThreadInvariantLayerNorm
            n += 1
    return n
