"""The two 8-bit code formats, as byte codes (uint8) and their fp32 values.

A code is the raw byte of the 8-bit value: ``float8_e4m3fn`` (sign, 4 exponent bits with bias 7,
3 mantissa bits, max 448, subnormal step 2**-9) or two's-complement ``int8`` (-127..127).
Dequantization is a 256-entry lookup ``value[code]`` followed by the row scale; fp8 arithmetic
on CPU is mostly unimplemented, so all compute happens in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["Format", "get_format", "code_values", "entropy_bits"]


@dataclass(frozen=True)
class Format:
    """``q_max``: largest finite magnitude; ``unit``: divisor that scales ``mean|q|`` to the format.

    ``unit`` makes lam mean about the same bit rate in both formats (float8 codes live near the
    subnormal range at low rates, int8 codes are integers up to 127): calibrated once on
    Gaussian, Laplace and SmolLM2 weights, see tests/test_quant_optimize.py.
    """

    name: str
    q_max: float
    unit: float
    dynamic_range_log2: float  # log2(q_max / smallest non-zero magnitude)

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` (already clamped to +-q_max) to the format; returns fp32 values."""
        if self.name == "e4m3":
            return x.to(torch.float8_e4m3fn).float()
        return torch.round(x)

    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Byte codes (uint8) of ``clamp(x, +-q_max)`` rounded to the format."""
        x = x.clamp(-self.q_max, self.q_max)
        if self.name == "e4m3":
            return x.to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.round(x).to(torch.int8).view(torch.uint8)


_FORMATS = {
    "e4m3": Format("e4m3", 448.0, 0.25, 17.8),
    "int8": Format("int8", 127.0, 127.0, 7.99),
}


def get_format(name: str) -> Format:
    if name not in _FORMATS:
        raise ValueError(f"unsupported code format {name!r}; expected one of {sorted(_FORMATS)}")
    return _FORMATS[name]


@lru_cache(maxsize=None)
def _values(name: str) -> torch.Tensor:
    b = torch.arange(256, dtype=torch.uint8)
    if name == "e4m3":
        v = b.view(torch.float8_e4m3fn).float()
        return torch.nan_to_num(v, nan=0.0)  # NaN bytes (0x7f, 0xff) are never produced
    return b.view(torch.int8).float()


def code_values(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 value of each of the 256 byte codes of format ``name``."""
    get_format(name)
    return _values(name).to(device)


def entropy_bits(codes: torch.Tensor) -> float:
    """Empirical entropy ``H = -sum_s p_s log2 p_s`` of the byte codes, in bits per symbol."""
    h = torch.bincount(codes.reshape(-1).to(torch.int64), minlength=256).double()
    n = h.sum()
    if n == 0:
        return 0.0
    p = h[h > 0] / n
    return float(-(p * p.log2()).sum())
