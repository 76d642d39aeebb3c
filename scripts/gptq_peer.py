"""GPTQ (``llmcompressor``) as a peer row of scripts/bench_budget.py, in a venv of its own.

``llmcompressor`` pins a transformers older than acip's, so it cannot share acip's venv. This file
has both sides of the hand-off:

* :func:`run` (acip's venv): writes the base model and the calibration windows to a folder, runs
  this file with another interpreter, and returns what that wrote.
* ``python scripts/gptq_peer.py --model DIR --calib FILE --bits B --group G --out DIR`` (the GPTQ
  venv, no acip import): GPTQ through ``llmcompressor.oneshot`` with symmetric int ``B``-bit
  weights in groups of ``G`` on every ``nn.Linear`` but ``lm_head``; saves the compressed
  checkpoint (``save_compressed=True``), counts its bytes with ``bench_budget.file_bytes`` (every
  tensor under a target layer: packed codes, scales, shapes), loads that checkpoint back
  (transformers' compressed-tensors loader, de-compressed to dense), and writes those de-quantized
  weights of the target layers (fp32) plus ``gptq.json`` (bytes, seconds, versions).

acip's side then copies the de-quantized weights into its own model and measures perplexity on the
same windows as every other row. Set-up of the venv (once, the second step installs transformers 5.17.0)::

    python3 -m venv /work/gptq-venv
    /work/gptq-venv/bin/pip install torch==2.13.0          # first: the CPU build, so nothing pulls another
    /work/gptq-venv/bin/pip install llmcompressor==0.14.0.1 torch==2.13.0
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "llmcompressor"


class GPTQUnavailable(RuntimeError):
    """The GPTQ interpreter, or ``llmcompressor`` in it, is missing."""


def check_python(python: str | os.PathLike) -> str:
    """Return ``llmcompressor``'s version in ``python``; raise :class:`GPTQUnavailable` saying what is missing."""
    py = Path(python)
    if not py.is_file() or not os.access(py, os.X_OK):
        raise GPTQUnavailable(f"--gptq-python {str(python)!r} is not an executable file: create the GPTQ venv "
                              f"(see the docstring of scripts/gptq_peer.py) and pass its bin/python")
    r = subprocess.run([str(py), "-c", f"import importlib.metadata as m, {PACKAGE}; print(m.version('{PACKAGE}'))"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no error text)"])[-1]
        raise GPTQUnavailable(f"{str(python)!r} cannot import {PACKAGE} ({tail}): install it there with "
                              f"`{py} -m pip install {PACKAGE}==0.14.0.1 torch==2.13.0`")
    return r.stdout.strip().splitlines()[-1]  # the import may log lines of its own before it


def run(python: str | os.PathLike, model_dir: str | os.PathLike, calib_file: str | os.PathLike, bits: int,
        group: int, out: str | os.PathLike, timeout: float = 3600) -> dict:
    """Run the GPTQ step of this file under ``python``; return its ``gptq.json`` (plus ``weights``: the file
    of de-quantized target weights). Raises :class:`GPTQUnavailable` or ``RuntimeError`` with the step's
    error text."""
    check_args(bits, group)
    check_python(python)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for what, p in (("model_dir", Path(model_dir) / "config.json"), ("calib_file", Path(calib_file))):
        if not p.is_file():
            raise FileNotFoundError(f"{what}: no file {str(p)!r}")
    cmd = [str(python), str(Path(__file__).resolve()), "--model", str(Path(model_dir).resolve()),
           "--calib", str(Path(calib_file).resolve()), "--bits", str(bits), "--group", str(group), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(HERE)}  # bench_budget.file_bytes; never acip
    log = out / "gptq.log"  # the step's whole output (llmcompressor logs to stderr)
    with open(log, "w") as fh:  # cwd=out: whatever llmcompressor writes beside it stays there
        r = subprocess.run(cmd, env=env, timeout=timeout, stdout=fh, stderr=subprocess.STDOUT, cwd=str(out))
    if r.returncode != 0:
        raise RuntimeError(f"GPTQ step failed (exit {r.returncode}): {' '.join(cmd)}\n"
                           f"{log.read_text(errors='replace')[-4000:]}")
    info = json.loads((out / "gptq.json").read_text())
    info["weights"] = str(out / "dequantized.safetensors")
    return info


def check_args(bits: int, group: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int (the group size, e.g. 128), got {group!r}")


# ------------------------------------------------------------------------------------- the GPTQ venv's side
def _gptq(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from bench_budget import file_bytes  # counts the saved tensors like every other row
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    torch.set_num_threads(1)
    ids = load_file(args.calib)["input_ids"].long()
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=True, strategy="group", group_size=args.group))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    sec = time.perf_counter() - t
    out = Path(args.out)
    saved = out / "compressed"
    model.save_pretrained(saved, save_compressed=True)
    nbytes = file_bytes(saved, names)
    kinds: dict[str, str] = {}
    from safetensors import safe_open

    for f in saved.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if k.startswith(names[0] + "."):
                    kinds[k[len(names[0]) + 1:]] = f"{fh.get_slice(k).get_dtype()} {fh.get_slice(k).get_shape()}"
    del model
    try:
        w, how = _reload(saved, names), "transformers (CompressedTensorsConfig(dequantize=True))"
    except Exception as e:  # noqa: BLE001 - then de-quantize the saved tensors with compressed-tensors' own functions
        print(f"[gptq] reload through transformers failed ({type(e).__name__}: {str(e)[:300]}); "
              f"de-quantizing the saved tensors with compressed_tensors", flush=True)
        w, how = _unpack(saved, names, scheme.weights), "compressed_tensors unpack_from_int32 + dequantize"
    save_file(w, str(out / "dequantized.safetensors"))
    from importlib.metadata import version

    vers = {p: version(p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors")}
    (out / "gptq.json").write_text(json.dumps({
        "bits": args.bits, "group": args.group, "symmetric": True, "bytes": nbytes, "seconds": sec,
        "layers": len(names), "calib_windows": int(ids.shape[0]), "calib_len": int(ids.shape[1]),
        "tensors_per_layer": kinds, "dequantized_by": how, "versions": vers}, indent=1))
    print(f"[gptq] W{args.bits} g{args.group}: {nbytes} bytes over {len(names)} layers, {sec:.0f}s, {vers}",
          flush=True)


def _reload(saved: Path, names: list[str]) -> dict:
    """Target weights of the compressed checkpoint, loaded back by transformers and de-compressed to dense fp32."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    back = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))
    w = {}
    for n in names:
        mod = back.get_submodule(n)
        wt = getattr(mod, "weight", None)
        if not isinstance(wt, torch.Tensor) or wt.dtype != torch.float32 or wt.is_meta:
            raise RuntimeError(f"{n} did not load back as a dense fp32 weight ({type(mod).__name__}, weight "
                               f"{None if wt is None else (wt.dtype, wt.device)}, tensors "
                               f"{sorted(k for k, _ in mod.named_parameters())}): the checkpoint was not de-compressed")
        w[f"{n}.weight"] = wt.detach().float().contiguous()
    return w


def _unpack(saved: Path, names: list[str], qargs) -> dict:
    """Target weights de-quantized from the saved ``weight_packed`` / ``weight_scale`` / ``weight_shape``."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors import safe_open

    t = {}
    for f in saved.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            t.update({k: fh.get_tensor(k) for k in fh.keys()})
    w = {}
    for n in names:
        shape = torch.Size(t[f"{n}.weight_shape"].tolist())
        q = unpack_from_int32(t[f"{n}.weight_packed"], qargs.num_bits, shape)
        w[f"{n}.weight"] = dequantize(x_q=q, scale=t[f"{n}.weight_scale"], zero_point=None,
                                      args=qargs).float().contiguous()
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a transformers model directory (config + safetensors)")
    ap.add_argument("--calib", required=True, help="safetensors with input_ids (n, len): KJV training windows")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    check_args(args.bits, args.group)
    _gptq(args)


if __name__ == "__main__":
    main()
