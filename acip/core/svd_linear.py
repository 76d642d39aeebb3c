"""The SVD-parametrized linear layer of ACIP.

A dense layer ``y = W x + b`` (W: out x in) is rewritten through its thin SVD
``W = U S V^T`` with ``k = min(in, out)`` singular directions::

    ortho = U / c            (out x k)       base = S V^T    (k x in)
    y     = ortho @ (g(mask) * (base @ x)) + b

``mask`` is a trainable vector in R^k initialised to the constant ``c`` (the mask scaling), and
``g`` is a straight-through binarisation: its forward value is ``c`` where ``mask > 0`` and 0
elsewhere, its gradient is that of ``ReLU(mask)``. At initialisation ``g(mask) = c`` everywhere,
so the layer equals ``W`` exactly (up to the SVD's round-off). ``W`` itself is never
materialised in the forward pass; only the active directions take part in the matmuls, so a
layer with few active directions is cheaper than the dense one.

Optional LoRA adapters add ``s * B (A x)`` (A: r x in, B: out x r, s = alpha / r).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SVDLinear", "straight_through_mask", "dense_weight_of", "rank_cost"]


def rank_cost(rank: int, in_features: int, out_features: int, bias: bool = False) -> int:
    """Parameters needed to store a layer at ``rank``: ``min(r*(in+out), in*out)`` (+ out for bias).

    A factorisation that would cost more than the dense matrix is stored dense instead, so the
    cost is capped at ``in*out``. Monotone non-decreasing in ``rank``.
    """
    return min(rank * (in_features + out_features), in_features * out_features) + (
        out_features if bias else 0
    )


def straight_through_mask(mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """``g(m)``: forward ``c * 1[m > 0]``, backward ``d ReLU(m) / dm``."""
    soft = torch.relu(mask)
    hard = (mask > 0).to(mask.dtype) * scaling
    return hard + (soft - soft.detach())  # forward value exactly `hard`


def dense_weight_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (W as out x in, bias) of an ``nn.Linear`` or a transformers ``Conv1D``.

    Raises a ``TypeError`` naming the module type for anything else.
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        # transformers' GPT-2 Conv1D stores W^T (in x out) and computes x @ W + b.
        return module.weight.detach().t(), None if module.bias is None else module.bias.detach()
    raise TypeError(
        f"acip can only parametrize nn.Linear (or transformers' Conv1D) layers, got "
        f"{type(module).__name__}. Exclude it with exclude_modules=[...] or pick target_modules "
        f"that name linear layers only."
    )


class SVDLinear(nn.Module):
    """``y = ortho(g(mask) * base(x)) + b`` with a straight-through mask over singular directions.

    Buffers ``ortho`` (out x k), ``base`` (k x in) and ``bias`` are frozen; ``mask`` (k,) is the
    only trainable tensor unless LoRA is enabled. (Under ``trainer=fsdp`` the training run re-registers
    the three as frozen parameters with the same names so that FSDP shards them; nothing here
    depends on which kind they are.) ``keep`` (bool, k) is an optional reversible
    pruning mask used by :meth:`acip.core.parametrize.ACIPModel.prune`; it is not saved.
    """

    def __init__(
        self,
        ortho: torch.Tensor,
        base: torch.Tensor,
        bias: torch.Tensor | None,
        mask_scaling: float = 2e-2,
        singular_values: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not (mask_scaling > 0 and math.isfinite(mask_scaling)):
            raise ValueError(f"mask_scaling must be a positive finite number, got {mask_scaling!r}")
        out_f, k = ortho.shape
        if base.shape[0] != k:
            raise ValueError(f"ortho is {tuple(ortho.shape)} but base is {tuple(base.shape)}")
        self.in_features = int(base.shape[1])
        self.out_features = int(out_f)
        self.max_rank = int(k)
        self.mask_scaling = float(mask_scaling)
        self.register_buffer("ortho", ortho.contiguous())
        self.register_buffer("base", base.contiguous())
        self.register_buffer("bias", None if bias is None else bias.clone())
        sv = singular_values if singular_values is not None else base.norm(dim=1)
        self.register_buffer("singular_values", sv.detach().float().clone())
        self.mask = nn.Parameter(torch.full((k,), self.mask_scaling, dtype=torch.float32, device=ortho.device))
        self.keep: torch.Tensor | None = None
        self.dense_view = False  # True: forward is the original dense layer (see ACIPModel.dense_view)
        self.whitened = False  # True when base = S V^T L^{-1} (V^T L^{-1} not orthonormal)
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scaling = 0.0
        self.lora_dropout: nn.Module = nn.Identity()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        mask_scaling: float = 2e-2,
        svd_dtype: torch.dtype = torch.float64,
        whitening: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> "SVDLinear":
        """Factorise a dense layer exactly: ``ortho = U / c``, ``base = S V^T``.

        The SVD runs on ``device`` (default: where the weight is) in ``svd_dtype``, never below
        float32 (float64 by default, so that the fp32 layer is reproduced to ~1e-7 relative
        error; a bf16/fp16 layer is factorised in float32 unless float64 is asked for). The factors
        are stored in the layer's dtype on ``device``; the singular values stay float32. With a
        whitening factor ``L`` (in x in, lower triangular; see :mod:`acip.core.whiten`) the SVD is
        of ``W L = U S V^T`` and ``base = S V^T L^{-1}``: still exactly ``W`` at full rank. The
        workspace (the weight in ``svd_dtype`` and ``U``, ``S``, ``V^T``) is one layer's and is
        freed on return; ``module`` itself is not changed.
        """
        weight, bias = dense_weight_of(module)
        dev = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        work = torch.promote_types(svd_dtype, torch.float32)  # never an SVD in bf16/fp16
        w = weight.to(device=dev, dtype=work)
        if not torch.isfinite(w).all():
            raise ValueError("the weight holds NaN or inf values; cannot take its SVD")
        if whitening is not None:
            if whitening.shape != (w.shape[1], w.shape[1]):
                raise ValueError(f"whitening factor has shape {tuple(whitening.shape)}, expected {(w.shape[1],) * 2}")
            lw = whitening.to(device=dev, dtype=work)
            u, s, vh = torch.linalg.svd(w @ lw, full_matrices=False)
            del w
            base = torch.linalg.solve_triangular(lw, s[:, None] * vh, upper=False, left=False)
            del lw
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            del w
            base = s[:, None] * vh
        del vh
        ortho = (u / mask_scaling).to(dtype)
        del u
        base = base.to(dtype)
        if bias is not None:
            bias = bias.to(dev)
        layer = cls(ortho, base, bias, mask_scaling, singular_values=s.float())
        layer.whitened = whitening is not None
        return layer

    @classmethod
    def from_factors(cls, module: nn.Module, ortho: torch.Tensor, base: torch.Tensor,
                     singular_values: torch.Tensor, mask_scaling: float = 2e-2) -> "SVDLinear":
        """Rebuild a layer from saved factors (no SVD); ``module`` gives the bias, dtype and device.

        The factors must reproduce ``module``'s weight at full rank (checked to 1e-3 relative
        Frobenius error), so saved factors of another model are refused.
        """
        weight, bias = dense_weight_of(module)
        if ortho.shape != (weight.shape[0], base.shape[0]) or base.shape[1] != weight.shape[1]:
            raise ValueError(f"saved factors {tuple(ortho.shape)} x {tuple(base.shape)} do not fit a layer of "
                             f"shape {tuple(weight.shape)}")
        o, b = ortho.to(device=weight.device, dtype=weight.dtype), base.to(device=weight.device, dtype=weight.dtype)
        w = (o.double() * mask_scaling) @ b.double()
        err = ((w - weight.double()).norm() / weight.double().norm().clamp_min(1e-30)).item()
        del w
        # 16-bit factors carry their own rounding (bf16: 8 bits of mantissa), so they get a wider margin
        tol = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 3e-2
        if err > tol:
            raise ValueError(f"saved factors do not reproduce this layer's weight (relative error {err:.2e}): "
                             f"they belong to another base model")
        return cls(o, b, bias, mask_scaling, singular_values=singular_values.float())

    def add_lora(self, r: int, alpha: float, dropout: float = 0.0) -> None:
        """Attach LoRA factors: A ~ kaiming-uniform (r x in), B = 0 (out x r), scale alpha / r."""
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        a = torch.empty(r, self.in_features, dtype=self.base.dtype, device=self.base.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, r, dtype=self.base.dtype, device=self.base.device)
        )
        self.lora_scaling = float(alpha) / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # ------------------------------------------------------------------ sizes
    def cost(self, rank: int) -> int:
        """Stored parameters at ``rank`` (see :func:`rank_cost`), bias included."""
        return rank_cost(rank, self.in_features, self.out_features, self.bias is not None)

    def dense_cost(self) -> int:
        """Parameters of the original dense layer, ``in*out`` (+ bias)."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def active(self) -> torch.Tensor:
        """Boolean (k,) of directions that take part in the forward: ``mask > 0`` and kept."""
        act = self.mask.detach() > 0
        return act if self.keep is None else act & self.keep

    def active_rank(self) -> int:
        return int(self.active().sum())

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_view:  # the uncompressed layer W x + b: every direction, no adapter, no gradient
            with torch.no_grad():
                return nn.functional.linear(nn.functional.linear(x, self.base) * self.mask_scaling, self.ortho,
                                            self.bias)
        gate = straight_through_mask(self.mask, self.mask_scaling)
        act = self.active()
        n_act = int(act.sum())
        if n_act == self.max_rank:
            base, ortho = self.base, self.ortho
        else:  # compute only the active ranks (pruned ones have zero value and zero gradient)
            idx = act.nonzero().squeeze(1)
            base, ortho, gate = self.base.index_select(0, idx), self.ortho.index_select(1, idx), gate[idx]
        h = nn.functional.linear(x, base)
        # the gate (and so the mask's gradient) stays fp32: applied in fp32, cast back to h's dtype
        h = h * gate if h.dtype == gate.dtype else (h.float() * gate).to(h.dtype)
        y = nn.functional.linear(h, ortho, self.bias)
        if self.lora_A is not None:
            y = y + self.lora_scaling * nn.functional.linear(
                nn.functional.linear(self.lora_dropout(x), self.lora_A), self.lora_B
            )
        return y

    def extra_repr(self) -> str:
        lora = "" if self.lora_A is None else f", lora_r={self.lora_A.shape[0]}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"max_rank={self.max_rank}, mask_scaling={self.mask_scaling}{lora}"
        )

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def dense_weight(self, keep_idx: torch.Tensor, with_lora: bool = True) -> torch.Tensor:
        """``W_keep + s B A`` (out x in): exactly what the layer computes with only ``keep_idx`` active.

        ``W_keep = c * ortho[:, idx] @ base[idx]``. No re-truncation: a layer stored dense costs
        ``in*out`` whatever its rank, so the adapter is folded in as is. ``with_lora=False`` leaves
        the adapter out (``W_keep`` alone).
        """
        w = (self.ortho.index_select(1, keep_idx) * self.mask_scaling) @ self.base.index_select(0, keep_idx)
        if with_lora and self.lora_A is not None:
            w = w + self.lora_scaling * (self.lora_B.detach() @ self.lora_A.detach())
        return w

    def factors(self, keep_idx: torch.Tensor, with_lora: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact rank-r factors ``(up: out x r, down: r x in)`` of the kept directions, LoRA folded
        (``with_lora=False``: the truncation alone, ``U_r``, ``S_r V_r^T``).

        Without LoRA: ``up = c * ortho[:, idx]`` (= U_r), ``down = base[idx]`` (= S_r V_r^T).
        With LoRA, ``W = [U_r | s B] [base_r ; A]``. Write ``[U_r | sB] = Q1 R1`` and
        ``[base_r ; A]^T = Q2 R2`` with orthonormal Q1, Q2; if ``R1 R2^T = P S' Q^T`` then the best
        rank-r approximation of W is ``(Q1 P_r S'_r)(Q_r^T Q2^T)``, exactly rank r. Because U_r and
        V_r are already orthonormal, only the LoRA parts need a QR: ``Q1 = [U_r | qr(sB - U_r U_r^T sB)]``
        and likewise for ``A^T`` against ``V_r = base_r^T / S_r`` (plain QRs of the whole blocks for
        whitened layers, whose V is not orthonormal).
        """
        r = int(keep_idx.numel())
        dt = self.base.dtype
        if not with_lora or self.lora_A is None or r == 0:
            return self.ortho.index_select(1, keep_idx) * self.mask_scaling, self.base.index_select(0, keep_idx)
        u = self.ortho.index_select(1, keep_idx).double() * self.mask_scaling
        base_r = self.base.index_select(0, keep_idx).double()
        sb = self.lora_scaling * self.lora_B.detach().double()
        at = self.lora_A.detach().double().t()
        sv = self.singular_values.index_select(0, keep_idx.to(self.singular_values.device)).double()
        if not self.whitened and bool(sv.min() > 1e-12 * sv.max().clamp_min(1e-30)):
            v = base_r.t() / sv
            cb, ca = u.t() @ sb, v.t() @ at
            qb, rb = torch.linalg.qr(sb - u @ cb)
            qa, ra = torch.linalg.qr(at - v @ ca)
            l = sb.shape[1]
            kw = {"dtype": u.dtype, "device": u.device}
            r1 = torch.cat([torch.cat([torch.eye(r, **kw), cb], 1),
                            torch.cat([torch.zeros(l, r, **kw), rb], 1)], 0)
            r2 = torch.cat([torch.cat([torch.diag(sv.to(u.device)), ca], 1),
                            torch.cat([torch.zeros(l, r, **kw), ra], 1)], 0)
            p, s, qh = torch.linalg.svd(r1 @ r2.t(), full_matrices=False)
            ps = p[:, :r] * s[:r]
            up = u @ ps[:r] + qb @ ps[r:]
            down = qh[:r, :r] @ v.t() + qh[:r, r:] @ qa.t()
            return up.to(dt), down.to(dt)
        q1, r1 = torch.linalg.qr(torch.cat([u, sb], dim=1))
        q2, r2 = torch.linalg.qr(torch.cat([base_r.t(), at], dim=1))
        p, s, qh = torch.linalg.svd(r1 @ r2.t(), full_matrices=False)
        return (q1 @ (p[:, :r] * s[:r])).to(dt), (qh[:r] @ q2.t()).to(dt)
