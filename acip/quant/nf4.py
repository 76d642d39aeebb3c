"""bitsandbytes 4-bit NF4 hand-off (``quantize_(model, NF4Config())`` or ``"nf4"``), saveable and reloadable.

Each target ``nn.Linear`` (``W`` of shape ``out x in``) is quantized by bitsandbytes' NF4 with
double quantization: blocks of ``B = 64`` consecutive weights share an absmax ``a_b``, each weight
stores the 4-bit index ``q`` of the nearest of 16 NormalFloat levels ``c_q`` so that
``W_i ~= c_q(i) * a_b(i)``; the absmax values are themselves 8-bit quantized in blocks of 256
(second-level absmax ``a2``, code book ``c2`` and an offset ``o``: ``a_b ~= c2[k_b] * a2 + o``).

The layer becomes :class:`NF4Linear`, which keeps every tensor of that state as a plain persistent
buffer (``qweight`` packed uint8, ``absmax``, ``quant_map``, ``nested_absmax``,
``nested_quant_map``, ``quant_state`` = bitsandbytes' packed metadata blob); float tensors are
stored bit for bit as int32, so ``from_pretrained(dtype=torch.bfloat16)`` cannot round them.
Their shapes, dtypes and the sha256 of each (``acip.core.io.tensor_digest``) go to the model
config's ``acip_layout`` (kind ``"nf4"``), so ``save_pretrained`` + ``acip.load`` rebuild the
layer, refuse corrupted bytes with a :class:`~acip.core.io.ChecksumError` naming the tensor, and give logits
identical to the saved model's (same bytes, same bitsandbytes kernel). The forward pass runs a
``bnb.nn.Linear4bit`` built from those buffers on first use (not part of the state dict).

Stored bytes per layer = packed 4-bit weight + every tensor of ``quant_state.as_dict(packed=True)``,
the same "every stored byte" rule as ours.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.io import ChecksumError, tensor_digest
from ..core.layout import register_module_kind
from .config import NF4Config
from .registry import register_quantizer

__all__ = ["nf4_stored_bytes", "is_nf4", "NF4Linear", "KIND_NF4", "build_nf4_from_entry"]

KIND_NF4 = "nf4"
_BLOB = "quant_state"  # buffer name of bitsandbytes' packed non-tensor state
_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # buffer name == bnb key


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(
            f"quantize='nf4' needs bitsandbytes (>= 0.45 has a CPU backend), which could not be imported ({e}). "
            f"Install it with `pip install 'bitsandbytes>=0.45'` (or `pip install -e '.[bench]'`), "
            f"or use quantize='entropy', which needs no extra package."
        ) from None
    return bnb


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in an nf4 layout entry: the config is corrupted")
    return dt


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    """Floats bit for bit as int32 (a dtype cast on load cannot touch them); others unchanged."""
    t = t.detach().contiguous()
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.is_floating_point():
        raise ValueError(f"bitsandbytes state tensor of dtype {t.dtype} is not supported (expected float32)")
    return t


class NF4Linear(nn.Module):
    """``y = x dequant_nf4(qweight)^T + b`` through bitsandbytes' 4-bit kernel (see module docstring).

    Build it with :meth:`from_linear4bit` (after quantizing) or from a layout entry (on load).
    ``n_params`` counts the dense weight (``out * in`` + bias) for ``acip.size_report``.
    """

    def __init__(self, entry: dict[str, Any], device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_entry(entry)
        self.in_features, self.out_features = int(entry["in_features"]), int(entry["out_features"])
        self.name = str(entry.get("name", "weight"))
        self.entry = dict(entry)
        for name, spec in entry["tensors"].items():
            self.register_buffer(name, torch.empty(spec["shape"], dtype=_dtype(spec["stored_dtype"]), device=device))
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device)) if entry["bias"] else None
        self._inner: nn.Module | None = None  # bnb Linear4bit over the buffers, built on first use

    @classmethod
    def from_linear4bit(cls, q: nn.Module, name: str) -> "NF4Linear":
        """Take over the packed weight and quant state of a quantized ``bnb.nn.Linear4bit``."""
        w = q.weight
        qs = w.quant_state
        if qs is None:
            raise ValueError(f"{name}: the Linear4bit is not quantized yet (move it to a device first)")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError(f"{name}: the 4-bit weight was repacked for AVX512-BF16; quantize again and save "
                             f"before the first forward, or set support_avx512bf16_for_cpu=False")
        state = qs.as_dict(packed=True)
        blob = [k for k in state if k.startswith("quant_state.")]
        if len(blob) != 1:
            raise ValueError(f"{name}: unexpected bitsandbytes quant_state keys {sorted(state)}")
        tensors = {"qweight": w.data, _BLOB: state[blob[0]]}
        for key in _STATE_KEYS:
            if key in state:
                tensors[key] = state[key]
        stored = {k: _as_stored(v) for k, v in tensors.items()}
        entry = {
            "kind": KIND_NF4, "name": name, "in_features": int(q.in_features), "out_features": int(q.out_features),
            "bias": q.bias is not None, "blob_key": blob[0],
            "tensors": {k: {"shape": list(v.shape), "stored_dtype": str(v.dtype).replace("torch.", ""),
                            "dtype": str(tensors[k].dtype).replace("torch.", "")} for k, v in stored.items()},
            "digests": {k: tensor_digest(v) for k, v in stored.items()},
        }
        m = cls(entry, device=w.device)
        for k, v in stored.items():
            setattr(m, k, v.clone())
        if q.bias is not None:
            m.bias = nn.Parameter(q.bias.detach().float().clone(), requires_grad=False)
        return m

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The buffers that hold the quantized weight (what ``save_pretrained`` writes, minus bias)."""
        return {k: getattr(self, k) for k in self.entry["tensors"]}

    def stored_bytes(self) -> dict[str, int]:
        """Bytes of the packed 4-bit weight and of its quantization state (bias not counted)."""
        st = self.stored_tensors()
        packed = int(st["qweight"].numel() * st["qweight"].element_size())
        state = sum(int(t.numel() * t.element_size()) for k, t in st.items() if k != "qweight")
        return {"stream": packed, "tables": state, "scales": 0}

    @property
    def n_params(self) -> int:
        """Parameters this layer represents (``out * in`` + bias), as for the dense layer."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def _build(self) -> nn.Module:
        """A ``bnb.nn.Linear4bit`` over this layer's buffers, after checking their sha256."""
        bnb = _bnb()
        st = self.stored_tensors()
        if any(t.device.type == "meta" for t in st.values()):
            raise RuntimeError(f"{self.name}: the NF4 weights were never loaded (still on the meta device)")
        for k, want in self.entry["digests"].items():
            if tensor_digest(st[k]) != want:
                tensor = f"{self.name}.{k}"
                raise ChecksumError(f"tensor {tensor!r}: sha256 of the stored NF4 state does not match: the checkpoint "
                                    f"is corrupted or truncated; re-save it from the original model", tensor=tensor)
        dev = st["qweight"].device
        spec = self.entry["tensors"]
        stats: dict[str, torch.Tensor] = {}
        for k, t in st.items():
            if k == "qweight":
                continue
            key = self.entry["blob_key"] if k == _BLOB else k
            want = _dtype(spec[k]["dtype"])
            stats[key] = t.view(want) if t.dtype != want else t
        q = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit.from_prequantized(st["qweight"], stats, requires_grad=False, device=dev, module=q)
        _no_bf16_repack(q)
        return q.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._inner is None:  # kept out of the module tree: not in state_dict / modules()
            object.__setattr__(self, "_inner", self._build())
        b = self.bias
        y = self._inner(x.float() if x.dtype != torch.float32 else x)
        if b is not None:
            y = y + b.float()
        return y.to(x.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> "NF4Linear":  # rebuild after .to()/.cuda()
        super()._apply(fn, recurse)
        object.__setattr__(self, "_inner", None)
        return self

    def describe(self) -> str:
        """One progress line: bits/param, every stored byte counted."""
        return f"nf4, {8.0 * sum(self.stored_bytes().values()) / max(1, self.in_features * self.out_features):.2f} bits"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.describe()}"


def _no_bf16_repack(q: nn.Module) -> None:
    """Stop bitsandbytes from repacking the weight in place on AVX512-BF16 CPUs (lossy on save)."""
    if hasattr(q, "set_support_avx512bf16_for_cpu"):
        q.set_support_avx512bf16_for_cpu(False)
    elif hasattr(q, "support_avx512bf16_for_cpu"):
        q.support_avx512bf16_for_cpu = False


def _check_entry(entry: dict[str, Any]) -> None:
    need = ("in_features", "out_features", "bias", "tensors", "digests", "blob_key")
    missing = [k for k in need if k not in entry]
    if missing == ["digests"] and "sha256" in entry:
        raise ValueError(f"nf4 layout entry {entry.get('name', '?')!r} carries one combined sha256 (an acip before the "
                         f"per-tensor digests): re-quantize the dense model with quantize_(model, 'nf4') and save it")
    if missing:
        raise ValueError(f"nf4 layout entry {entry.get('name', '?')!r} lacks {missing}: the config is corrupted "
                         f"or was written by another acip version; re-export the model")
    if "qweight" not in entry["tensors"] or _BLOB not in entry["tensors"] or set(entry["digests"]) != set(entry["tensors"]):
        raise ValueError(f"nf4 layout entry {entry.get('name', '?')!r} lists no qweight/quant_state tensors, or "
                         f"digests for other tensors than it stores: the config is corrupted; re-export the model")


def build_nf4_from_entry(entry: dict[str, Any], old: nn.Module) -> nn.Module:
    """Layout hook builder: an empty :class:`NF4Linear` with the buffer shapes of ``entry``."""
    dev = None
    for t in list(old.parameters(recurse=False)) + list(old.buffers(recurse=False)):
        dev = t.device
        break
    return NF4Linear(entry, device=dev)


def is_nf4(module: nn.Module) -> bool:
    """True for an :class:`NF4Linear` or a quantized ``bnb.nn.Linear4bit``."""
    return isinstance(module, NF4Linear) or getattr(getattr(module, "weight", None), "quant_state", None) is not None


def nf4_stored_bytes(module: nn.Module) -> int:
    """Bytes of the packed weight and its quantization state (not counting the bias)."""
    if isinstance(module, NF4Linear):
        return sum(module.stored_bytes().values())
    w = module.weight
    total = int(w.numel() * w.element_size())
    for v in w.quant_state.as_dict(packed=True).values():
        if isinstance(v, torch.Tensor):
            total += int(v.numel() * v.element_size())
    return total


@register_quantizer(NF4Config, "nf4")
def _nf4_linear(lin: nn.Linear, cfg: NF4Config, name: str) -> NF4Linear | None:
    """One ``nn.Linear`` -> :class:`NF4Linear` (bitsandbytes NF4, double quant); None (stays dense)
    when ``in_features`` is not a multiple of 64 (bitsandbytes' CPU blocks need whole rows)."""
    bnb = _bnb()
    if lin.in_features % 64:
        return None
    dev = lin.weight.device
    if dev.type != "cpu" and dev.type != "cuda":
        raise RuntimeError(f"{name}: bitsandbytes NF4 runs on cpu/cuda, the layer is on {dev}; move the model "
                           f"to one of them first")
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True, device="cpu")
    q.weight = bnb.nn.Params4bit(lin.weight.data.float().cpu().clone(), requires_grad=False,
                                 quant_type="nf4", compress_statistics=True)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.float().cpu().clone(), requires_grad=False)
    try:
        q = q.to(dev)
        _no_bf16_repack(q)
    except Exception as e:  # noqa: BLE001 - bitsandbytes raises many types
        raise RuntimeError(
            f"{name}: bitsandbytes could not quantize to NF4 on {dev} ({type(e).__name__}: {e}). "
            f"Its CPU backend needs bitsandbytes >= 0.45; use quantize='entropy' instead."
        ) from None
    return NF4Linear.from_linear4bit(q, name)


register_module_kind(KIND_NF4, build_nf4_from_entry)
