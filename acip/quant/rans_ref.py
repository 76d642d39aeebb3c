"""Reference codec for ``acip.quant.rans``: constriction's ``AnsCoder`` with a ``Categorical``
model of the histogram. Used by tests and scripts/bench_rans.py as the correctness oracle and
the speed/size baseline (it holds the GIL and has no GPU path).
"""

from __future__ import annotations

import numpy as np

__all__ = ["constriction_encode", "constriction_decode"]


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
