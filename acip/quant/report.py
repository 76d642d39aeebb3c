"""``acip.quant.report(model)``: bits per parameter counting every stored byte, per layer and total.

bits/param of a layer = 8 * (payload + frequency table + sha256 + scales + raw planes) / (out * in);
raw planes are the lossless mode's stored sign/mantissa bytes (0 for the other quantizers).
Bias and every non-quantized tensor (embeddings, norms) are reported separately, in fp32 bytes as
saved, so ``model_bytes`` is the size of the tensors in the safetensors file. ``empty`` lists the
linears whose weight has no elements (factors of rank-0 layers): valid, with nothing to quantize,
so ``quantize_`` leaves them as they are.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..core.surgery import output_embedding
from .lossless import LosslessLinear
from .module import EntQuantLinear
from .nf4 import NF4Linear, is_nf4, nf4_stored_bytes

__all__ = ["QuantReport", "LayerRow", "report"]


@dataclass(frozen=True)
class LayerRow:
    name: str
    method: str  # "entquant", "absmax8" (a fallback), "nf4" or "lossless"
    fmt: str
    params: int  # weight parameters (out * in)
    stream_bytes: int
    table_bytes: int  # packed frequency table + 32-byte sha256
    scale_bytes: int
    file_bytes: int  # every tensor of the layer as written (incl. bias)
    bits: float  # 8 * (stream + table + scale + raw bytes) / params
    entropy: float  # empirical entropy of the codes, bits per code (lossless: H(exponent) + raw bits per weight)
    unique: int  # distinct codes
    rel_error: float  # ||W - What||_1 / ||W||_1 at quantization time (nan if unknown)
    reason: str | None  # why the layer fell back, if it did
    raw_bytes: int = 0  # lossless mode: sign/mantissa planes stored uncoded

    @property
    def coded_bytes(self) -> int:
        return self.stream_bytes + self.table_bytes + self.scale_bytes + self.raw_bytes


@dataclass
class QuantReport:
    rows: list[LayerRow]
    other_bytes: int  # bytes of all non-quantized tensors (embeddings, norms, biases elsewhere)
    other_params: int
    empty: list[str] = field(default_factory=list)  # linears with an empty weight (rank 0), left as is

    @property
    def total(self) -> dict[str, Any]:
        params = sum(r.params for r in self.rows)
        coded = sum(r.coded_bytes for r in self.rows)
        wsum = lambda key: sum(getattr(r, key) * r.params for r in self.rows) / max(params, 1)  # noqa: E731
        return {
            "layers": len(self.rows),
            "params": params,
            "coded_bytes": coded,
            "stream_bytes": sum(r.stream_bytes for r in self.rows),
            "table_bytes": sum(r.table_bytes for r in self.rows),
            "scale_bytes": sum(r.scale_bytes for r in self.rows),
            "raw_bytes": sum(r.raw_bytes for r in self.rows),
            "file_bytes": sum(r.file_bytes for r in self.rows),
            "bits": 8.0 * coded / max(params, 1),
            "entropy": wsum("entropy"),
            "rel_error": wsum("rel_error"),
            "model_bytes": sum(r.file_bytes for r in self.rows) + self.other_bytes,
            "other_bytes": self.other_bytes,
            "other_params": self.other_params,
        }

    @property
    def fallbacks(self) -> list[str]:
        return [r.name for r in self.rows if r.method == "absmax8"]

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "total": self.total, "fallbacks": self.fallbacks,
                "empty": list(self.empty)}

    def __str__(self) -> str:
        head = f"{'layer':<44} {'method':<8} {'params':>9} {'bits':>6} {'H':>6} {'uniq':>5} {'rel.err':>8} {'file B':>9}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name[-44:]:<44} {r.method:<8} {r.params:>9} {r.bits:>6.3f} {r.entropy:>6.3f} "
                         f"{r.unique:>5} {r.rel_error:>8.4f} {r.file_bytes:>9}")
        t = self.total
        lines.append("-" * len(head))
        lines.append(f"{'total (quantized layers)':<44} {'':<8} {t['params']:>9} {t['bits']:>6.3f} {t['entropy']:>6.3f} "
                     f"{'':>5} {t['rel_error']:>8.4f} {t['file_bytes']:>9}")
        raw = f", raw planes {t['raw_bytes']}" if t["raw_bytes"] else ""
        lines.append(f"bytes: streams {t['stream_bytes']}, tables {t['table_bytes']}, scales {t['scale_bytes']}{raw}; "
                     f"other tensors {t['other_bytes']} ({t['other_params']} params); whole model {t['model_bytes']}")
        if self.fallbacks:
            lines.append("fallback to absmax8: " + ", ".join(f"{r.name} ({r.reason})" for r in self.rows if r.method == "absmax8"))
        if self.empty:
            lines.append(f"skipped, empty weight (rank 0, nothing to quantize): {', '.join(self.empty)}")
        return "\n".join(lines)


def _tensor_bytes(t: Any) -> int:
    return int(t.numel() * t.element_size())


def _nf4_row(name: str, m: nn.Module) -> LayerRow:
    params = m.in_features * m.out_features
    stored = nf4_stored_bytes(m)
    packed = int(m.stored_bytes()["stream"]) if isinstance(m, NF4Linear) else _tensor_bytes(m.weight)
    bias = 0 if m.bias is None else _tensor_bytes(m.bias)
    nan = float("nan")
    return LayerRow(name, "nf4", "nf4", params, packed, stored - packed, 0, stored + bias,
                    8.0 * stored / params, nan, 16, nan, None)


def _lossless_row(name: str, m: LosslessLinear) -> LayerRow:
    b, st = m.stored_bytes(), m.entry.get("stats", {})
    params = m.in_features * m.out_features
    file_bytes = sum(_tensor_bytes(t) for t in list(m.buffers(recurse=False)) + list(m.parameters(recurse=False)))
    return LayerRow(name, "lossless", m.entry["dtype"], params, b["stream"], b["tables"], 0, file_bytes,
                    8.0 * sum(b.values()) / max(params, 1), float(st.get("exp_entropy", float("nan"))) + st.get("raw_bits", 0),
                    int(st.get("unique", -1)), 0.0, None, raw_bytes=b["raw"])


def report(model: nn.Module) -> QuantReport:
    """Per-layer and total storage of a quantized model, measured from its tensors."""
    rows, seen, empty = [], set(), []
    head = output_embedding(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m is not head and m.weight.numel() == 0:
            empty.append(name)
        if is_nf4(m):
            rows.append(_nf4_row(name, m))
            seen.update(t.data_ptr() for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
            continue
        if isinstance(m, LosslessLinear):
            rows.append(_lossless_row(name, m))
            seen.update(t.data_ptr() for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
            continue
        if not isinstance(m, EntQuantLinear):
            continue
        b = m.stored_bytes()
        stats = m.entry.get("stats", {})
        params = m.in_features * m.out_features
        file_bytes = sum(_tensor_bytes(t) for t in m.buffers(recurse=False))
        file_bytes += sum(_tensor_bytes(p) for p in m.parameters(recurse=False))
        for t in list(m.buffers(recurse=False)) + list(m.parameters(recurse=False)):
            seen.add(t.data_ptr())
        rows.append(LayerRow(
            name=name, method=m.method, fmt=m.fmt, params=params, stream_bytes=b["stream"],
            table_bytes=b["tables"], scale_bytes=b["scales"], file_bytes=file_bytes,
            bits=8.0 * sum(b.values()) / max(params, 1), entropy=float(stats.get("entropy", float("nan"))),
            unique=int(stats.get("unique", -1)), rel_error=float(stats.get("rel_error", float("nan"))),
            reason=stats.get("reason"),
        ))
    other_bytes = other_params = 0
    ptrs = set(seen)
    for t in model.state_dict().values():  # what save_pretrained writes (tied tensors once)
        if t.device.type == "meta" or t.data_ptr() in ptrs:
            continue
        ptrs.add(t.data_ptr())
        other_bytes += _tensor_bytes(t)
        other_params += t.numel() if t.is_floating_point() else 0
    return QuantReport(rows, other_bytes, other_params, empty)
