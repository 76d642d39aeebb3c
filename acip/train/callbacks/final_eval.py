"""Final evaluation: held-out perplexity at the test ratios, ACIP vs the no-training baselines.

For each test ratio rho: ``acip.export(pm, ratio=rho, score_map=module.score_map)`` from the
trained model in memory (LoRA folded in; export never changes ``pm``); for a run with adapters
also ``adapters=False`` (column
``acip_no_adapters``: the adapters are trained at the stop ratio and can hurt well above it); and
the same for ``ScoreMap.from_singular_values`` on the *untrained* weights (exported with
``adapters=False``, which makes the factors exactly ``U_r, S_r V_r^T``). Optionally also the
activation-aware baseline (SVD-LLM style): ``W L = U S V^T`` with ``L`` the Cholesky factor of
``X^T X`` of each layer's inputs on ``calib_windows`` training windows, directions ranked by
their singular values (see :mod:`acip.core.whiten`). Perplexity is measured on the same held-out windows; the
ratio reported is the measured one of the exported model. Writes ``results.json`` and
``plots/*.png`` (rank 0), logs images, a table and ``final/ppl_<method>_r<100*rho>`` scalars.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch

from .. import plots

__all__ = ["FinalEvaluation", "evaluate_score_maps", "metric_key"]


def metric_key(method: str, ratio: float) -> str:
    """``final/ppl_acip_r50`` for ratio 0.5 (no dots: W&B sweeps read it as a flat key)."""
    return f"final/ppl_{method}_r{int(round(100 * ratio))}"


def evaluate_score_maps(score_maps: dict[str, Any], windows: torch.Tensor, ratios: Sequence[float],
                        pm: Any, log: Any = print) -> dict[str, Any]:
    """``{method: {ratio: ppl}}``, measured ratios and kept ranks, exporting ``pm`` with each map at each ratio.

    A value of ``score_maps`` is a ScoreMap, or ``(ScoreMap, export_kwargs)``, e.g.
    ``(sm, {"adapters": False})`` for the trained map exported without its adapters, or for an
    untrained baseline on a model whose adapters were trained.
    """
    import acip
    from acip.eval.perplexity import perplexity

    ppl: dict[str, dict[float, float]] = {}
    measured: dict[str, dict[float, float]] = {}
    ranks: dict[str, dict[float, dict[str, int]]] = {}
    for method, entry in score_maps.items():
        sm, kwargs = entry if isinstance(entry, tuple) else (entry, {})
        ppl[method], measured[method], ranks[method] = {}, {}, {}
        for rho in ratios:
            t0 = time.perf_counter()
            small = acip.export(pm, ratio=rho, score_map=sm, **kwargs)
            ppl[method][rho] = perplexity(small, None, windows, progress=False)
            measured[method][rho] = float(small.config.acip_export["measured_ratio"])
            ranks[method][rho] = {n: e["rank"] for n, e in small.config.acip_layout.items()}  # as exported
            del small
            log(f"[acip] eval {method:16s} ratio {rho:.2f} (measured {measured[method][rho]:.3f}) "
                f"ppl {ppl[method][rho]:.2f} [{time.perf_counter() - t0:.0f}s]")
    return {"ppl": ppl, "measured_ratio": measured, "ranks": ranks}


class FinalEvaluation(pl.Callback):
    """Runs on rank 0 at the end of training (other ranks wait at a barrier)."""

    def __init__(self, run_dir: str | Path, tokenizer: Any, heldout_texts: Sequence[str],
                 ratios: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4), seq_len: int = 256,
                 max_windows: int | None = 40, baseline: bool = True,
                 extra: dict | None = None, calib_texts: Sequence[str] | None = None,
                 calib_windows: int = 0, no_adapters: bool = True) -> None:
        from acip.core.size import check_ratio

        self.run_dir, self.tokenizer = Path(run_dir), tokenizer
        self.heldout_texts = list(heldout_texts)
        self.ratios = sorted((check_ratio(r, "eval.ratios") for r in ratios), reverse=True)
        self.seq_len, self.max_windows, self.baseline = int(seq_len), max_windows, bool(baseline)
        self.extra = dict(extra or {})
        if calib_windows < 0 or (calib_windows and not calib_texts):
            raise ValueError(f"calib_windows={calib_windows} needs calibration texts (the training text); "
                             f"pass calib_texts or set eval.activation_aware_windows=0")
        self.calib_texts, self.calib_windows = list(calib_texts or []), int(calib_windows)
        self.no_adapters = bool(no_adapters)
        self.results: dict[str, Any] | None = None
        self.t_start = time.time()

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.t_start = time.time()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self.results = self.run(trainer, pl_module)
        if trainer.world_size > 1:
            trainer.strategy.barrier("acip_final_eval")

    @torch.no_grad()
    def run(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, Any]:
        from acip import ScoreMap
        from acip.core.io import atomic_write
        from acip.eval.perplexity import token_windows
        from acip.eval.sweep import format_table, plot_ratio_curves

        train_time = time.time() - self.t_start
        pm = pl_module.pm
        pm.eval()
        windows = token_windows(self.tokenizer, self.heldout_texts, self.seq_len, self.max_windows)
        maps: dict[str, Any] = {"acip": pl_module.score_map}
        if self.no_adapters and pm.lora_parameters():  # the same map, the run's adapters left out
            maps["acip_no_adapters"] = (maps["acip"], {"adapters": False})
        if self.baseline:  # on a run in the activation-aware basis this *is* the activation-aware map
            base_map = ScoreMap.from_singular_values(pm)  # untrained: the adapters left out
            maps[base_map.method] = (base_map, {"adapters": False})
        t0 = time.time()
        ev = evaluate_score_maps(maps, windows, self.ratios, pm)
        extra_maps = []
        if self.baseline and "singular_values" not in maps:  # a whitened run: plain SVD of W as well
            extra_maps.append(self.plain_singular_values(pm))
        if self.calib_windows and "activation_aware" not in maps:
            extra_maps.append(self.activation_aware(pm))
        for other_pm, other_map in extra_maps:
            ev_other = evaluate_score_maps({other_map.method: other_map}, windows, self.ratios, other_pm)
            for key in ev:
                ev[key].update(ev_other[key])
        del extra_maps
        st = pl_module.schedule
        results = {
            "ratios": self.ratios,
            "ppl": {m: {f"{r:g}": v for r, v in d.items()} for m, d in ev["ppl"].items()},
            "measured_ratio": {m: {f"{r:g}": v for r, v in d.items()} for m, d in ev["measured_ratio"].items()},
            "ranks": {m: {f"{r:g}": v for r, v in d.items()} for m, d in ev["ranks"].items()},
            "stop_ratio": st.stop_ratio,
            "reached_stop_ratio": st.stop_step is not None,
            "stop_step": st.stop_step,
            "post_tune_steps": st.post_tune_done(trainer.global_step),
            "final_size_ratio": pm.size_ratio(),
            "global_step": int(trainer.global_step),
            "train_time_s": train_time,
            "eval_time_s": time.time() - t0,
            "eval": {"seq_len": self.seq_len, "windows": int(len(windows)), "tokens": int(windows.numel())},
            "world_size": trainer.world_size,
            "score_map_digests": list(pl_module.rank_digests),
            **self.extra,
        }
        atomic_write(self.run_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
        pdir = self.run_dir / "plots"
        sm = maps["acip"]
        names = list(sm.scores)
        pngs = {
            "ratio_vs_ppl": plot_ratio_curves(ev["ppl"], pdir / "ratio_vs_ppl.png"),
            "score_heatmap": plots.plot_score_heatmap(sm.scores, pdir / "score_heatmap.png"),
            "kept_ranks": plots.plot_kept_ranks(ev["ranks"]["acip"], {n: sm.scores[n].numel() for n in names},
                                                pdir / "kept_ranks.png"),
        }
        table = format_table(ev["ppl"], ratios=self.ratios, suffix=" ppl")
        print("\n[acip] held-out perplexity by size ratio (target layers)\n" + table, flush=True)
        self.log_results(trainer, ev, pngs)
        return results

    @staticmethod
    def untrained_dense(pm: Any) -> Any:
        """A dense copy of the model before training: full ratio, no adapters (exactly the original W)."""
        import acip
        from acip import ScoreMap

        return acip.export(pm, 1.0, score_map=ScoreMap.from_singular_values(pm), adapters=False)

    def plain_singular_values(self, pm: Any) -> tuple[Any, Any]:
        """(plain-SVD parametrized copy of the untrained model, its singular-value score map)."""
        import acip
        from acip import ScoreMap

        plain = acip.parametrize(self.untrained_dense(pm), pm.acip_config.replace(basis="plain", lora=None))
        return plain, ScoreMap.from_singular_values(plain)

    def activation_aware(self, pm: Any) -> tuple[Any, Any]:
        """(whitened parametrized copy of the untrained model, its activation-aware score map)."""
        import acip
        from acip.eval.perplexity import token_windows

        calib = token_windows(self.tokenizer, self.calib_texts, self.seq_len, self.calib_windows)
        white = acip.activation_aware(self.untrained_dense(pm), calib.split(4), target_modules=list(pm.svd_layers()),
                                      svd_dtype=pm.acip_config.torch_svd_dtype)
        return white, white.score_map

    def log_results(self, trainer: pl.Trainer, ev: dict[str, Any], pngs: dict[str, Path]) -> None:
        """Scalars to every logger; images and a table to W&B."""
        from lightning.pytorch.loggers import WandbLogger

        scalars = {metric_key(m, r): v for m, d in ev["ppl"].items() for r, v in d.items()}
        rows = [[r] + [ev["ppl"][m][r] for m in ev["ppl"]] + [ev["measured_ratio"][m][r] for m in ev["ppl"]]
                for r in self.ratios]
        cols = ["ratio"] + [f"ppl_{m}" for m in ev["ppl"]] + [f"measured_ratio_{m}" for m in ev["ppl"]]
        for lg in trainer.loggers:
            lg.log_metrics(scalars, step=trainer.global_step)
            if isinstance(lg, WandbLogger):
                for key, path in pngs.items():
                    lg.log_image(key=f"plots/{key}", images=[str(path)], step=trainer.global_step)
                lg.log_table(key="final/results", columns=cols, data=rows, step=trainer.global_step)
