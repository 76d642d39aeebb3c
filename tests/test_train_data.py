"""Packing and batch order of the training data."""
from __future__ import annotations

import pytest
import torch

from acip.train.data import DatasetTooSmallError, PackedSequences, PackedTextDataModule, StepSampler, pack_tokens, text_files
from acip.train.models import byte_tokenizer

TEXTS = [f"verse {i}: and it came to pass that the number was {i * i}." for i in range(200)]


def test_pack_tokens_concatenates_texts_with_newlines_and_cuts_full_rows():
    tok = byte_tokenizer()
    seqs = pack_tokens(tok, TEXTS, seq_len=32)
    stream = "".join(t + "\n" for t in TEXTS).encode()
    assert seqs.shape == (len(stream) // 32, 32)
    assert tok.decode(seqs[0].tolist()) == stream[:32].decode()


def test_batches_are_a_function_of_seed_step_and_rank():
    ds = PackedSequences(torch.arange(40).view(10, 4), seed=3)
    s0 = StepSampler(batch_size=2, total_steps=8, rank=0, world_size=2)
    s1 = StepSampler(batch_size=2, total_steps=8, rank=1, world_size=2)
    i0, i1 = list(s0), list(s1)
    assert i0[:4] == [0, 1, 4, 5] and i1[:4] == [2, 3, 6, 7] and not set(i0) & set(i1)
    rows = [int(ds[i]["input_ids"][0]) // 4 for i in range(10)]
    assert sorted(rows) == list(range(10))  # epoch 0 is a permutation of all sequences
    assert rows == [int(PackedSequences(torch.arange(40).view(10, 4), seed=3)[i]["input_ids"][0]) // 4 for i in range(10)]
    assert rows != [int(PackedSequences(torch.arange(40).view(10, 4), seed=4)[i]["input_ids"][0]) // 4 for i in range(10)]
    step = [5]
    resumed = StepSampler(2, 8, 0, 2, start_step=lambda: step[0])
    assert list(resumed) == i0[5 * 2:]  # a run resumed at step 5 sees the batches of steps 5..7


def test_dataset_shorter_than_one_batch_names_the_sizes_and_the_fix():
    dm = PackedTextDataModule(byte_tokenizer(), ["a short text"] * 3, seq_len=64, batch_size=4, total_steps=10)
    with pytest.raises(DatasetTooSmallError, match=r"packs into 0 sequences.*batch_size=4.*lower acip.seq_len"):
        dm.prepare()


def test_text_files_split_paragraphs_and_hold_out_the_tail(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n\n".join(f"paragraph {i}" for i in range(20)))
    train, held = text_files([str(f)], heldout_fraction=0.1)
    assert train[0] == "paragraph 0" and held == ["paragraph 18", "paragraph 19"]
    with pytest.raises(FileNotFoundError, match="no file at"):
        text_files([str(tmp_path / "missing.txt")])


def test_a_binary_data_file_is_named_without_printing_its_bytes(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(bytes(range(256)) * 256)  # 64 KB, not UTF-8
    with pytest.raises(ValueError) as e:
        text_files([str(f)])
    msg = str(e.value)
    assert str(f) in msg and "not UTF-8 text" in msg and len(msg) < 500 and e.value.__cause__ is None
    nul = tmp_path / "zeros.txt"  # valid UTF-8, but binary
    nul.write_bytes(b"abc\x00\x00\x00" * 1000)
    with pytest.raises(ValueError, match=r"zeros.txt.*not UTF-8 text \(byte 0x00 at offset 3"):
        text_files([str(nul)])


def test_bad_jsonl_names_the_file_the_line_and_the_missing_key(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "one"}\n\n{"text": "two"\n')
    with pytest.raises(ValueError, match=r"data.jsonl' line 3 is not valid JSON"):
        text_files([str(f)])
    f.write_text('{"text": "one"}\n{"body": "two", "id": 2}\n')
    with pytest.raises(ValueError, match=r"data.jsonl' line 2 has no \"text\" key \(keys \['body', 'id'\]\)"):
        text_files([str(f)])
    f.write_text('{"text": "one"}\n["two"]\n')
    with pytest.raises(ValueError, match=r"line 2 has no \"text\" key \(a JSON list\)"):
        text_files([str(f)])
    f.write_text("\n".join(f'{{"text": "verse {i}"}}' for i in range(10)))
    train, held = text_files([str(f)])
    assert train[0] == "verse 0" and held == ["verse 9"]
