"""Reference codec for ``acip.quant.rans``: constriction's ``AnsCoder`` with a ``Categorical``
model of the histogram, and the ideal code length of a histogram. Used by tests/test_rans.py and
scripts/bench_rans.py as the correctness oracle and the speed/size baseline (constriction holds
the GIL and has no GPU path). Not part of the library.
"""

from __future__ import annotations

import numpy as np

__all__ = ["constriction_encode", "constriction_decode", "ideal_bits"]


def ideal_bits(hist: np.ndarray) -> float:
    """Ideal code length of a histogram in bits, in total: ``sum_s -c_s log2(c_s / n)``.

    (Per symbol that is the empirical entropy, ``acip.quant.formats.entropy_bits``.)
    """
    c = np.asarray(hist, dtype=np.float64)
    c = c[c > 0]
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum()) if n > 0 else 0.0


def _model(hist: np.ndarray):  # noqa: ANN202 - constriction type
    import constriction

    p = np.asarray(hist, dtype=np.float64)
    return constriction.stream.model.Categorical(p / max(p.sum(), 1.0), perfect=False)


def constriction_encode(symbols: np.ndarray, hist: np.ndarray) -> np.ndarray:
    """Encode with constriction's ``AnsCoder`` against ``hist``; returns uint32 words."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.asarray(symbols).reshape(-1).astype(np.int32), _model(hist))
    return coder.get_compressed()


def constriction_decode(compressed: np.ndarray, hist: np.ndarray, n_symbols: int) -> np.ndarray:
    """Decode ``n_symbols`` symbols from ``constriction_encode`` output; returns uint8."""
    import constriction

    coder = constriction.stream.stack.AnsCoder(np.asarray(compressed, dtype=np.uint32))
    return coder.decode(_model(hist), int(n_symbols)).astype(np.uint8)
