"""acip.quant: entropy-coded 8-bit quantization (EntQuant style) and the bitsandbytes NF4 hand-off.

```python
from acip.quant import EntropyQuantConfig, NF4Config, quantize_
tiny = quantize_(model, EntropyQuantConfig(lam=58.0, lr=0.25))   # in place; or "entropy", "nf4", NF4Config()
exact = quantize_(bf16_model, LosslessConfig())   # or "lossless": bit-exact, ~11 bits per bf16 weight
print(acip.quant.report(tiny))              # bits/param per layer and in total, entropy, error
tiny.save_pretrained("out/tiny"); again = acip.load("out/tiny")
acip.quant.set_decode_mode(again, "lazy", cache_layers=2)                    # streams stay coded
```

``quantize_`` is the one verb: quantizers register a per-layer handler for their config type
with :func:`register_quantizer` (:mod:`acip.quant.registry`). Importing this package registers the
``"entquant"``, ``"nf4"`` and ``"lossless"`` layout kinds (``acip.core.layout.register_module_kind``), so
``from_pretrained`` rebuilds quantized layers. Everything else below stays importable as
plumbing (codec, optimizer, report rows).
"""
from ..core.io import ChecksumError
from .api import quantized_layers, set_decode_mode
from .codec import CodecError, EncodedTensor, decode_codes, decode_many, encode_codes
from .config import EntropyQuantConfig, NF4Config
from .lossless import LosslessConfig, LosslessLinear
from .module import EntQuantLinear
from .nf4 import NF4Linear
from .optimize import OutlierError, QuantResult, absmax8, quantize_weight
from .registry import quantize_, register_quantizer, resolve_config, target_linears
from .report import LayerRow, QuantReport, report

__all__ = [
    "ChecksumError", "EntQuantLinear", "EntropyQuantConfig", "LosslessConfig", "LosslessLinear", "NF4Config",
    "quantize_", "register_quantizer", "report", "set_decode_mode",
]
