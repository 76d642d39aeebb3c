"""Data at scale: ``data=hf_dataset`` streaming, token budget, on-the-fly packing, validation split,
shuffle buffer; the ``data=c4`` preset offline. Local json/parquet files through ``datasets``."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")

from acip.train.data import (DatasetTooSmallError, PackedStream, PackedTextDataModule, TextStream,  # noqa: E402
                             hf_dataset)
from acip.train.models import byte_tokenizer  # noqa: E402
from helpers_train import child_env, run_compress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOK = byte_tokenizer()
ROW_CHARS = 90  # every training row below is ~90 bytes = ~90 byte tokens (+1 newline)


def _rows(n: int, prefix: str = "row") -> list[dict]:
    return [{"text": f"{prefix} {i:06d} " + "abcdefghij" * 8, "id": i} for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict:
    """~40k rows (~3.7 M tokens) of json training text and a small validation file."""
    d = tmp_path_factory.mktemp("big")
    return {"train": str(_jsonl(d / "train.jsonl", _rows(40_000))),
            "validation": str(_jsonl(d / "val.jsonl", _rows(30, "val")))}


def test_streaming_reads_about_the_token_budget_of_a_far_larger_dataset(big):
    budget = 8192  # ~90 rows of a ~3.7 M-token dataset
    train, held = hf_dataset("json", data_files=big, streaming=True, token_budget=budget)
    assert isinstance(train, TextStream)
    assert held == [r["text"] for r in _rows(30, "val")]  # the dataset's own validation split
    dm = PackedTextDataModule(TOK, train, seq_len=64, batch_size=4, total_steps=5)
    assert dm.prepare() is None and dm.sequences is None  # never materialised
    train.rows_read = 0
    rows = [b["input_ids"] for b in dm.stream()]  # 5 steps x 4 rows x 64 tokens = 1280 tokens
    assert len(rows) == 20 and all(r.shape == (64,) and r.dtype == torch.long for r in rows)
    assert train.rows_read <= 1280 // ROW_CHARS + 16 + 2  # what the steps need (+ one tokenizer chunk)
    # more steps than the budget holds: the stream repeats; each pass reads about the budget
    train.rows_read = 0
    long = PackedStream(train, TOK, 64, 4, total_steps=80)  # 80*4*64 = 20480 tokens = 2.5 budgets
    n = sum(1 for _ in long)
    assert n == 320
    per_epoch = budget // ROW_CHARS
    assert 2 * per_epoch <= train.rows_read <= 3 * (per_epoch + 16)


def test_packing_on_the_fly_matches_packing_the_list():
    rows = _rows(200)
    texts = [r["text"] for r in rows]

    class FakeDs(list):
        def skip(self, n):
            return FakeDs(self[n:])

    stream = TextStream(lambda: FakeDs(rows))
    packed = torch.stack([r for r in PackedStream(stream, TOK, 32, 2, 10**6).rows(0)])
    from acip.train.data import pack_tokens

    assert torch.equal(packed, pack_tokens(TOK, texts, 32))


def test_batches_split_by_rank_and_resume_at_a_step(big):
    train, _ = hf_dataset("json", data_files=big, streaming=True, token_budget=20_000)
    one = [b["input_ids"] for b in PackedStream(train, TOK, 32, 2, 6)]
    r0 = [b["input_ids"] for b in PackedStream(train, TOK, 32, 2, 3, rank=0, world_size=2)]
    r1 = [b["input_ids"] for b in PackedStream(train, TOK, 32, 2, 3, rank=1, world_size=2)]
    # step t of rank r: rows (t*w + r)*B ... +B of the same packed stream
    assert torch.equal(torch.stack(r0), torch.stack(one[0:2] + one[4:6] + one[8:10]))
    assert torch.equal(torch.stack(r1), torch.stack(one[2:4] + one[6:8] + one[10:12]))
    resumed = [b["input_ids"] for b in PackedStream(train, TOK, 32, 2, 6, start_step=lambda: 4)]
    assert torch.equal(torch.stack(resumed), torch.stack(one[8:]))


def test_shuffle_buffer_is_seeded_and_changes_with_the_epoch(big):
    def first_ids(seed, epoch, buffer=64):
        train, _ = hf_dataset("json", data_files=big, streaming=True, shuffle_buffer=buffer, seed=seed)
        return [int(t.split()[1]) for t, _ in zip(train.texts(epoch), range(40))]

    a, b = first_ids(0, 0), first_ids(0, 0)
    assert a == b and a != list(range(40))  # deterministic, not file order
    assert first_ids(0, 1) != a and first_ids(1, 0) != a
    assert max(a) < 40 + 64  # a buffer of 64 texts reads at most that far ahead
    assert first_ids(0, 0, buffer=0) == list(range(40))


def test_parquet_without_validation_split_holds_out_the_first_texts(tmp_path):
    import datasets

    rows = _rows(500)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    files = {"train": str(tmp_path / "train.parquet")}
    train, held = hf_dataset("parquet", data_files=files, token_budget=4096, max_heldout_texts=20)
    assert held == [r["text"] for r in rows[:20]]
    got = list(train.texts(0))
    assert got[0] == rows[20]["text"] and len(got) == 480  # training skips the held-out texts
    # without streaming or budget: a list, last heldout_fraction held out (as before)
    texts, held2 = hf_dataset("parquet", data_files=files, heldout_fraction=0.1)
    assert isinstance(texts, list) and len(texts) == 450 and held2[0] == rows[450]["text"]
    with pytest.raises(ValueError, match="text_field='body'"):
        list(hf_dataset("parquet", data_files=files, streaming=True, text_field="body",
                        validation_split=None)[0])
    with pytest.raises(ValueError, match="data.split='dev'"):
        hf_dataset("parquet", data_files=files, split="dev")


def test_a_budget_below_one_batch_fails_before_training(big):
    train, _ = hf_dataset("json", data_files=big, streaming=True, token_budget=100)
    with pytest.raises(DatasetTooSmallError, match="token_budget=100"):
        PackedTextDataModule(TOK, train, seq_len=32, batch_size=4, total_steps=3).prepare()


def test_c4_preset_offline_names_a_local_copy_and_reads_one(tmp_path):
    from omegaconf import OmegaConf

    conf = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "data" / "hf_dataset.yaml"),
                           OmegaConf.load(ROOT / "conf" / "data" / "c4.yaml"))
    assert (conf.path, conf.name, conf.streaming, conf.validation_split) == ("allenai/c4", "en", True, "validation")
    code = ("from acip.train.data import hf_dataset\n"
            "hf_dataset('allenai/c4', 'en', streaming=True, validation_split='validation')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("acip.train.data.DatasetUnavailableError: could not open the hub dataset 'allenai/c4'")
    assert "data.path=/data/c4" in last and "data_files" in last
    # a local copy laid out like C4's json.gz shards, opened the way the message says
    (tmp_path / "en").mkdir()
    for name, rows in (("c4-train.00000-of-00002.json.gz", _rows(100)), ("c4-train.00001-of-00002.json.gz",
                       _rows(100, "b")), ("c4-validation.00000-of-00001.json.gz", _rows(5, "val"))):
        with gzip.open(tmp_path / "en" / name, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    train, held = hf_dataset(str(tmp_path), streaming=True, validation_split="validation", data_files={
        "train": "en/c4-train.*.json.gz", "validation": "en/c4-validation.*.json.gz"})
    assert held == [r["text"] for r in _rows(5, "val")] and len(list(train)) == 200


def test_streaming_hf_dataset_run_end_to_end(tmp_path, big):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "acip.compress", "experiment=tiny", f"hydra.run.dir={run_dir}", "data=hf_dataset",
           "data.path=json", f"data.data_files={{train: {big['train']}, validation: {big['validation']}}}",
           "data.streaming=true", "data.token_budget=20000", "data.shuffle_buffer=32", "eval.enabled=false"]
    run_compress(run_dir, cmd=cmd, env=child_env(WANDB_MODE="disabled"))
    import acip

    sm = acip.ScoreMap.load(run_dir / "score_map.safetensors")
    assert sm.meta["updates"] > 0
