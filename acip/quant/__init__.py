"""acip.quant: entropy-coded 8-bit quantization (EntQuant style) and the bitsandbytes NF4 hand-off.

```python
from acip.quant import EntropyQuantConfig
tiny = acip.quant.quantize_(model, EntropyQuantConfig(lam=58.0, lr=0.25))   # in place
print(acip.quant.report(tiny))              # bits/param per layer and in total, entropy, error
tiny.save_pretrained("out/tiny"); again = acip.load("out/tiny")
acip.quant.set_decode_mode(again, "lazy", cache_layers=2)                    # streams stay coded
```

Importing this package registers the ``"entquant"`` layout kind, so ``from_pretrained`` rebuilds
quantized layers (``acip.core.lowrank`` layout hook, installed by ``import acip``).
"""
from .api import apply, quantize_, quantized_layers, register_kinds, set_decode_mode, target_linears
from .codec import ChecksumError, CodecError, EncodedTensor, decode_codes, decode_many, encode_codes
from .config import EntropyQuantConfig
from .module import EntQuantLinear
from .optimize import OutlierError, QuantResult, absmax8, quantize_weight
from .report import LayerRow, QuantReport, report

register_kinds()

__all__ = [
    "ChecksumError", "CodecError", "EncodedTensor", "EntQuantLinear", "EntropyQuantConfig", "LayerRow",
    "OutlierError", "QuantReport", "QuantResult", "absmax8", "apply", "decode_codes", "decode_many",
    "encode_codes", "quantize_", "quantize_weight", "quantized_layers", "report", "set_decode_mode",
    "target_linears",
]
