"""Quantizer configs: one validated dataclass per method (``EntropyQuantConfig``, ``NF4Config``), torchao style."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["EntropyQuantConfig", "NF4Config", "config_from_dict", "FORMATS", "FALLBACKS", "BACKENDS", "ALLOCATIONS",
           "SOLVERS", "ROUNDINGS"]

FORMATS = ("e4m3", "int8", "uniform")
FALLBACKS = ("absmax8", "raise", "keep")
BACKENDS = ("auto", "torch", "constriction")
ALLOCATIONS = ("uniform", "sensitivity")
SOLVERS = ("search", "lbfgs")
ROUNDINGS = ("nearest", "gptq")


def _number(name: str, value: Any, *, lo: float, lo_open: bool = False, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # strings from a command line ("14.5") are fine
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"EntropyQuantConfig.{name} must be a number, got {value!r}; {hint}") from None
    value = float(value)
    bad = not math.isfinite(value) or value < lo or (lo_open and value == lo)
    if bad:
        rel = ">" if lo_open else ">="
        raise ValueError(f"EntropyQuantConfig.{name} must be finite and {rel} {lo:g}, got {value!r}; {hint}")
    return value


def _integer(name: str, value: Any, *, lo: int, hint: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError(f"EntropyQuantConfig.{name} must be an integer, got {value!r}; {hint}")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"EntropyQuantConfig.{name} must be an integer, got {value!r}; {hint}") from None
    if out < lo:
        raise ValueError(f"EntropyQuantConfig.{name} must be >= {lo}, got {value!r}; {hint}")
    return out


def _choice(name: str, value: Any, choices: Sequence[str], hint: str) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"EntropyQuantConfig.{name}={value!r} is not supported; expected one of {list(choices)}. {hint}")
    return value.lower()


TARGET_HELP = ("a string is a regular expression that must match the whole dotted module name "
               "(e.g. r'.*\\.(q|v)_proj'), a list holds names or name suffixes (['q_proj', 'v_proj']), "
               "'all-linear' (or None) selects every nn.Linear except the output embedding")


def _targets(cls: str, name: str, value: Any) -> str | tuple[str, ...] | None:
    """``target_modules`` / ``exclude_modules`` as ``acip.core.surgery.matches`` reads them:
    a regex string (full match), or a tuple of names/suffixes; None = all (targets) / none (excludes)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "all-linear":
            if name == "exclude_modules":
                raise ValueError(f"{cls}.exclude_modules='all-linear' would exclude every layer; pass None, "
                                 f"a regex or a list of names to exclude ({TARGET_HELP})")
            return value
        if not value:
            raise ValueError(f"{cls}.{name}='' is an empty regular expression and matches no module; {TARGET_HELP}")
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{cls}.{name}={value!r} is a string, so it is read as a regular expression, and "
                             f"it does not compile ({e}); {TARGET_HELP}") from None
        return value
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"{cls}.{name} must be a regex string or a list of module names, got {value!r}; "
                        f"{TARGET_HELP}") from None
    if not all(isinstance(v, str) and v for v in out):
        raise TypeError(f"{cls}.{name} must hold non-empty strings, got {value!r}; {TARGET_HELP}")
    return out


def config_from_dict(cls: type, spec: Mapping[str, Any]) -> Any:
    """``cls(**spec)`` for a dataclass config, naming unknown fields (``_target_``/``name`` are dropped)."""
    d = {str(k): v for k, v in spec.items()}
    d.pop("_target_", None)
    d.pop("name", None)
    known = set(cls.__dataclass_fields__)
    extra = sorted(set(d) - known)
    if extra:
        raise TypeError(f"{cls.__name__} got unknown fields {extra}; known fields: {sorted(known)}")
    return cls(**d)


def _to_dict(cfg: Any) -> dict[str, Any]:
    d = asdict(cfg)
    for k in ("target_modules", "exclude_modules"):
        if isinstance(d[k], tuple):
            d[k] = list(d[k])
    return d


@dataclass
class EntropyQuantConfig:
    """Entropy-coded 8-bit quantization (EntQuant style) of every target ``nn.Linear``.

    For each weight ``W`` (out x in) and each row ``i`` a power-of-two scale ``2**t_i`` (integer
    ``t_i``) is chosen to minimise (exactly, row by row, with the default ``solver="search"``)

        L(t) = ||W - 2**t * q||_1 / ||W||_1 + lam * mean(|q|) / u_fmt,
        q = cast_fmt(clamp(W / 2**t, -q_max, q_max)),

    where ``cast_fmt`` rounds to float8 e4m3 (``q_max = 448``) or int8 (``q_max = 127``). The
    codes ``q`` are then entropy coded losslessly. ``lam`` sets the bit rate continuously: on
    LLM-like weights lam = 3.9 / 14.5 / 58 give roughly 4 / 3 / 2.3 bits per parameter.

    Fields:
        lam: rate weight (>= 0). 0 keeps full 8-bit precision (about 6.5 bits after coding).
        fmt: "e4m3" (float8, default), "int8" (integer codes, power-of-two steps) or "uniform"
            (below). On MiniLM int8 lost
            at matched bits (cos ~0.92 vs ~0.96 at 3.9 bits) and its 8-bit dynamic range sends
            outlier-heavy layers to the absmax8 fallback; see docs/BENCHMARKS.md.
            "uniform": entropy-coded uniform scalar quantization (ECSQ, ``acip.quant.optimize.
            quantize_uniform``): int8 codes ``round(W / Delta_i)`` with a per-row step
            ``Delta_i ~ c * rms_i`` stored in 1/16 octave, and ``c`` minimising
            ``||W - What||_F^2 / ||W||_F^2 + lam * H(codes) / 540`` per tensor (lam = 3.3 / 13.5 / 32.5
            stored 4.2 / 3.2 / 2.6 bits on MiniLM). Not the L1 objective above; ``solver`` and the
            LBFGS fields do not apply. Within 0.03-0.04 bits of ideal ECSQ at equal error on MiniLM,
            where e4m3 trails it by 0.19-0.46 bits (docs/BENCHMARKS.md, "The rate gap to ideal ECSQ").
        solver: "search" (default): the exact minimiser over integer exponents, every row's
            candidates evaluated at once (``acip.quant.optimize``). "lbfgs": the EntQuant
            paper's LBFGS over a continuous relaxation of the exponents (the default before
            2026-12-01), within 0.1-2% of the exact loss and about 3x slower; ``lr``,
            ``max_iter``, ``tol``, ``patience``, ``check_every`` and ``max_retries`` apply to it only.
        lr: LBFGS learning rate (> 0); halved on every NaN retry.
        max_iter: maximum LBFGS iterations per weight (>= 1).
        chunk_bytes: maximum symbols per independently decodable chunk/stream (>= 1024).
        fallback: what to do with layers the quantizer cannot handle (NaN after all retries,
            a dynamic range beyond the format's, or error above ``max_rel_error``):
            "absmax8" (per-row 8-bit absmax, coded the same way), "keep" (leave dense), "raise".
        tol: early stopping; stop when the best loss improved by less than ``tol`` (relative)
            over the last ``patience`` checks (one check every ``check_every`` iterations).
        max_retries: NaN retries with half the learning rate before falling back.
        max_rel_error: relative L1 error above which a layer falls back (0 < x <= 1).
        target_modules: which ``nn.Linear`` layers to quantize, with the one meaning acip gives it
            everywhere (``acip.core.surgery``): None or "all-linear" = every ``nn.Linear`` except
            the output embedding (``model.get_output_embeddings()``); a **string** is a regular
            expression that must match the whole dotted name (``r".*\\.q_proj"``); a **list**
            holds names or name suffixes (``["q_proj", "v_proj"]``). A selected low-rank layer
            (``LowRankLinear``) stands for its two factors ``.down`` and ``.up``.
        exclude_modules: never quantized; a regex string or a list of names/suffixes, as above.
        backend: ANS codec: "auto" (= "torch", our interleaved rANS), "torch" or
            "constriction" (the reference coder; needs that package).
        allocation: "uniform" (default, data-free): every layer at ``lam``. "sensitivity": lam
            varies by layer at the bytes uniform ``lam`` would take, from the empirical-Fisher
            cost model of :mod:`acip.quant.sensitivity` (needs calibration batches of training
            text: ``quantize_(model, cfg, calib=batches)``; see ``plan_layer_lams`` there):
            layers whose error costs more loss get a smaller lam (more bits).
        rounding: how the codes are chosen once the steps are set. "nearest" (default, data-free):
            ``q = round(W / Delta)``. "gptq" (``fmt="uniform"`` only; calibration batches needed:
            ``quantize_(model, cfg, calib=batches)``): the same per-row steps ``Delta_i`` and the same
            per-tensor ``c``, but the codes are chosen column by column with GPTQ's error feedback
            (Frantar et al., 2022). With ``H = X^T X + damp * mean(diag) * I`` of the layer's
            calibration inputs ``X`` (tokens x in) and ``U`` the upper Cholesky factor of ``H^{-1}``,
            after rounding column ``j`` its error ``e = (w_j - q_j * Delta) / U_jj`` is pushed onto
            the columns not rounded yet, ``W[:, j+1:] -= e U[j, j+1:]``: a greedy minimiser of the
            layer's output error ``||(W - What) X^T||_F^2`` instead of ``||W - What||_F^2``. The
            stored layer is the same kind (method "ecsq"), so the decoder does not change.
            ``allocation="sensitivity"`` combines with it (lam per layer, then gptq codes).
        damp: ``rounding="gptq"``'s dampening of ``H`` (> 0; relative to the mean of its diagonal).
        gram: set by ``quantize_`` for each layer with ``rounding="gptq"`` (its inputs' ``X^T X``,
            :func:`acip.core.whiten.input_grams`); never saved, not part of the config's identity.
            Given by the caller (one target layer, no ``calib=``), it is used as it is.
    """

    lam: float = 14.5
    fmt: str = "e4m3"
    lr: float = 1.0
    max_iter: int = 500
    chunk_bytes: int = 262144
    fallback: str = "absmax8"
    tol: float = 1e-3
    patience: int = 2
    check_every: int = 5
    max_retries: int = 3
    max_rel_error: float = 0.75
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    backend: str = "auto"
    allocation: str = "uniform"
    solver: str = "search"
    rounding: str = "nearest"
    damp: float = 0.01
    gram: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.lam = _number("lam", self.lam, lo=0.0, hint="use lam >= 0 (larger lam, fewer bits; e.g. 3.9, 14.5 or 58)")
        self.fmt = _choice("fmt", self.fmt, FORMATS,
                           "Use fmt='e4m3' (float8), fmt='int8' or fmt='uniform' (entropy-coded uniform steps).")
        self.lr = _number("lr", self.lr, lo=0.0, lo_open=True, hint="use a positive learning rate such as 1.0 or 0.25")
        self.max_iter = _integer("max_iter", self.max_iter, lo=1, hint="use e.g. max_iter=500")
        self.chunk_bytes = _integer("chunk_bytes", self.chunk_bytes, lo=1024, hint="use e.g. chunk_bytes=262144")
        self.fallback = _choice("fallback", self.fallback, FALLBACKS, "absmax8 is the safe default.")
        self.tol = _number("tol", self.tol, lo=0.0, hint="use e.g. tol=1e-3 (0 disables early stopping)")
        self.patience = _integer("patience", self.patience, lo=1, hint="use e.g. patience=2")
        self.check_every = _integer("check_every", self.check_every, lo=1, hint="use e.g. check_every=5")
        self.max_retries = _integer("max_retries", self.max_retries, lo=0, hint="use e.g. max_retries=3")
        self.max_rel_error = _number("max_rel_error", self.max_rel_error, lo=0.0, lo_open=True, hint="use e.g. 0.75")
        if self.max_rel_error > 1.0:
            raise ValueError(f"EntropyQuantConfig.max_rel_error must be <= 1 (a relative L1 error), got {self.max_rel_error!r}")
        self.target_modules = _targets("EntropyQuantConfig", "target_modules", self.target_modules)
        self.exclude_modules = _targets("EntropyQuantConfig", "exclude_modules", self.exclude_modules)
        self.backend = _choice("backend", self.backend, BACKENDS, "Use 'auto' unless you are comparing codecs.")
        self.allocation = _choice("allocation", self.allocation, ALLOCATIONS,
                                  "'uniform' is data-free; 'sensitivity' needs quantize_(model, cfg, calib=batches).")
        self.solver = _choice("solver", self.solver, SOLVERS,
                              "'search' is exact and the default; 'lbfgs' is the EntQuant paper's optimiser.")
        self.rounding = _choice("rounding", self.rounding, ROUNDINGS,
                                "'nearest' is data-free; 'gptq' needs fmt='uniform' and quantize_(model, cfg, calib=batches).")
        if self.rounding == "gptq" and self.fmt != "uniform":
            raise ValueError(f"EntropyQuantConfig(rounding='gptq') needs fmt='uniform' (uniform steps per row), got "
                             f"fmt={self.fmt!r}; pass EntropyQuantConfig(fmt='uniform', rounding='gptq', lam=...)")
        self.damp = _number("damp", self.damp, lo=0.0, lo_open=True, hint="use e.g. damp=0.01")
        if self.gram is not None:
            import torch

            if not isinstance(self.gram, torch.Tensor) or self.gram.dim() != 2 or self.gram.shape[0] != self.gram.shape[1]:
                raise TypeError(f"EntropyQuantConfig.gram must be a square tensor (a layer input's X^T X) or None, got "
                                f"{getattr(self.gram, 'shape', type(self.gram).__name__)}; quantize_ sets it from calib=")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import replace

        d = _to_dict(replace(self, gram=None) if self.gram is not None else self)  # asdict would deep-copy the Gram
        del d["gram"]
        for k, default in (("allocation", "uniform"), ("rounding", "nearest")):
            if d[k] == default:  # saved configs stay byte-identical to the format before the option
                del d[k]
        if "rounding" not in d:
            del d["damp"]
        return d


@dataclass
class NF4Config:
    """bitsandbytes 4-bit NormalFloat (NF4) with double quantization, per target ``nn.Linear``.

    Blocks of ``B = 64`` consecutive weights share an absmax ``a_b``; each weight stores the 4-bit
    index of the nearest of 16 NF4 levels ``c_q`` (quantiles of N(0, 1) scaled to [-1, 1]), so
    ``W_i ~= c_q(i) * a_b(i)``. The absmax values are 8-bit quantized again in blocks of 256.
    About 4.13 bits per parameter. Layers whose ``in_features`` is not a multiple of 64 stay
    dense (bitsandbytes' CPU blocks need whole rows of blocks).

    Fields:
        target_modules: as in :class:`EntropyQuantConfig` (None/"all-linear", a regex string
            that matches whole dotted names, or a list of names/suffixes).
        exclude_modules: never quantized; a regex string or a list of names/suffixes.
    """

    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.target_modules = _targets("NF4Config", "target_modules", self.target_modules)
        self.exclude_modules = _targets("NF4Config", "exclude_modules", self.exclude_modules)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)
