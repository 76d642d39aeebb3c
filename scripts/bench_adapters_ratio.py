"""Adapters at every ratio: a run's exports without adapters, with its own adapters, and with adapters
post-tuned at a ratio sampled per step (``python -m acip.finetune <run> mode=ratio_sampled``).

Perplexity of ``acip.export(pm, rho, adapters=...)`` on the validation split of the *training* texts
(the seeded random share that ``mode=ratio_sampled`` set aside and did not train on, read from the
post-tuned model's record) and on the held-out domains, which are only measured. Split in parts so
that each part is one short job; ``--table`` merges the parts into the markdown of docs/BENCHMARKS.md.

    python scripts/bench_adapters_ratio.py --run RUN --tuned TUNED --rows none,run --json a.json
    python scripts/bench_adapters_ratio.py --run RUN --tuned TUNED --rows sampled --json c.json
    python scripts/bench_adapters_ratio.py --table a.json c.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = {"none": "no adapters", "run": "the run's adapters", "sampled": "ratio-sampled post-tuned adapters"}


def measure(run: Path, tuned: Path, rows: list[str], ratios: list[float], windows: int, seq_len: int,
            domains: list[str]) -> dict:
    import torch

    import acip
    from acip.core.io import read_tensors
    from acip.core.parametrize import STATE_FILE, ACIPModel
    from acip.eval.domains import resolve_domains
    from acip.eval.perplexity import perplexity, token_windows
    from acip.finetune import _run_config, _texts, validation_texts
    from acip.train.callbacks.final_eval import evaluate_score_maps
    from machine import machine_header

    t0 = time.time()
    state, _ = read_tensors(tuned / STATE_FILE, what="post-tuned model state")
    sm_tuned = acip.ScoreMap.load(tuned / "score_map.safetensors")
    rec = sm_tuned.meta["ratio_sampled"]
    base, tok = acip.load_base(json.loads((run / "acip_config.json").read_text())["config"]["source"]["model"])
    pm = ACIPModel.from_pretrained(run, model=base)  # the tuned dir: its adapters only
    if sm_tuned.digest() != pm.score_map.digest():
        raise SystemExit(f"{tuned} was not post-tuned from {run}: the score maps differ")
    train, held, _ = _texts(_run_config(run), "run")
    _, val = validation_texts(train, tok, rec["validation"]["fraction"], rec["validation"]["seed"])
    wins = {"val": token_windows(tok, val, seq_len, windows)}
    for name, texts in resolve_domains(domains, held).items():
        wins[name] = token_windows(tok, texts, seq_len, windows)
    with torch.no_grad(), pm.dense_view():
        dense = {d: perplexity(pm, None, w, progress=False) for d, w in wins.items()}
    print(f"[bench] dense {dense} [{time.time() - t0:.0f}s]", flush=True)
    ppl, used = {}, {}
    for row in rows:
        if row == "sampled":
            pm.load_adapter_state(state, str(tuned / STATE_FILE))  # masks identical, adapters post-tuned
        kw = {"adapters": row != "none"}
        ev = evaluate_score_maps({row: (pm.score_map, kw)}, wins, ratios, pm)
        ppl[row] = {d: {f"{r:g}": v for r, v in ev["ppl"][d][row].items()} for d in wins}
        used[row] = {f"{r:g}": v for r, v in ev["adapters"][row].items()}
    return {"header": machine_header(), "run": str(run), "tuned": str(tuned), "ratios": ratios, "windows": windows,
            "seq_len": seq_len, "dense": dense, "ppl": ppl, "adapters_used": used, "post_tune": {
                k: rec[k] for k in ("steps", "ratios", "lr", "batch_size", "seq_len", "seed", "time_s", "validation")},
            "adapters_auto_sampled": sm_tuned.meta.get("adapters_auto"),
            "adapters_auto_sampled_val": sm_tuned.meta.get("adapters_auto_val"),
            "adapters_auto_run": rec.get("adapters_auto_before"), "time_s": time.time() - t0}


def table(parts: list[dict]) -> str:
    """One markdown table: a row per (domain, adapters), a column per ratio; ``x`` = times the dense model."""
    ppl = {k: v for p in parts for k, v in p["ppl"].items()}
    first = parts[0]
    ratios = [f"{r:g}" for r in first["ratios"]]
    lines = [f"| domain | adapters | dense | " + " | ".join(ratios) + " |",
             "|---|---|---|" + "---|" * len(ratios)]
    for d in first["dense"]:
        name = "validation (train split)" if d == "val" else d
        for row in ("none", "run", "sampled"):
            if row not in ppl:
                continue
            cells = []
            for r in ratios:
                v = ppl[row][d][r]
                best = min(ppl[k][d][r] for k in ppl)
                cell = f"{v:.1f} ({v / first['dense'][d]:.1f}x)"
                cells.append(f"**{cell}**" if v == best else cell)
            lines.append(f"| {name} | {ROWS[row]} | {first['dense'][d]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="the trained run directory")
    ap.add_argument("--tuned", type=Path, help="its mode=ratio_sampled output")
    ap.add_argument("--rows", default="none,run,sampled", help=f"comma-separated, of {list(ROWS)}")
    ap.add_argument("--ratios", default="0.9,0.8,0.7,0.6,0.5")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--domains", default="heldout,pydoc")
    ap.add_argument("--json", type=Path, help="write the measured part here")
    ap.add_argument("--table", type=Path, nargs="+", help="merge measured parts into one markdown table")
    args = ap.parse_args()
    if args.table:
        parts = [json.loads(p.read_text()) for p in args.table]
        print(parts[0]["header"] + "\n")
        print(table(parts))
        for p in parts:
            for key in ("adapters_auto_run", "adapters_auto_sampled", "adapters_used", "post_tune"):
                print(f"{key}: {p[key]}")
        return
    rows = [r for r in args.rows.split(",") if r]
    if not rows or set(rows) - set(ROWS):
        ap.error(f"--rows must name some of {list(ROWS)}, got {args.rows!r}")
    out = measure(args.run, args.tuned, rows, [float(r) for r in args.ratios.split(",")], args.windows,
                  args.seq_len, [d for d in args.domains.split(",") if d])
    print(out["header"])
    print(table([out]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
