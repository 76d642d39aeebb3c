"""Packing and batch order of the training data."""
from __future__ import annotations

import pickle

import pytest
import torch

from acip.train.data import (DatasetTooSmallError, PackedSequences, PackedTextDataModule, StepSampler, TokenRows,
                             pack_tokens, text_files, vocab_digest)
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


def token_rows(n: int = 10, L: int = 8, K: int = 3, teacher: bool = True) -> TokenRows:
    tokens = torch.arange(n * L).view(n, L) % 250
    ids = (tokens[..., None] + torch.arange(K)) % 250 if teacher else None  # position-aligned, recognisable
    logp = -(tokens[..., None] + torch.arange(K)).half() / 100 if teacher else None
    return TokenRows([f"row {i}" for i in range(n)], tokens, ids, logp, vocab=vocab_digest(byte_tokenizer()))


def test_token_rows_are_their_texts_and_select_rows_with_their_tensors():
    rows = token_rows()
    assert rows == [f"row {i}" for i in range(10)] and isinstance(rows, list)  # calibration and eval read texts
    part = rows.select([7, 2])
    assert list(part) == ["row 7", "row 2"] and torch.equal(part.tokens, rows.tokens[[7, 2]])
    assert torch.equal(part.teacher_logp, rows.teacher_logp[[7, 2]]) and part.vocab == rows.vocab
    head = rows[:4]
    assert isinstance(head, TokenRows) and torch.equal(head.teacher_ids, rows.teacher_ids[:4]) and rows[3] == "row 3"
    again = pickle.loads(pickle.dumps(rows))
    assert again == rows and torch.equal(again.teacher_ids, rows.teacher_ids)
    with pytest.raises(TypeError, match="read-only"):
        rows.append("another text")
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        rows.select([10])
    with pytest.raises(ValueError, match="one row per text"):
        TokenRows(["a"], torch.zeros(2, 4, dtype=torch.long))


def test_token_rows_train_as_they_are_with_the_teacher_in_the_batch_in_step_order():
    rows = token_rows(n=10, L=8, K=3)
    dm = PackedTextDataModule(byte_tokenizer(), rows, seq_len=6, batch_size=2, total_steps=5, seed=1)
    with pytest.warns(UserWarning, match="first 6 tokens only"):
        seqs = dm.prepare()
    assert torch.equal(seqs, rows.tokens[:, :6]), "each row's first seq_len tokens, not re-tokenized text"
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and set(batches[0]) == {"input_ids", "teacher_ids", "teacher_logp"}
    for b in batches:
        assert torch.equal(b["teacher_ids"][..., 0], b["input_ids"])  # every position keeps its own targets
        assert b["teacher_logp"].shape == (2, 6, 3) and b["teacher_logp"].dtype == torch.float16
    first = torch.cat([b["input_ids"] for b in batches])
    assert sorted(first[:, 0].tolist()) == sorted(rows.tokens[:, 0].tolist())  # epoch 0: each row once
    same = list(PackedTextDataModule(byte_tokenizer(), rows, 6, 2, 5, seed=1).train_dataloader())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, same))
    ds, sampler = dm.train_dataloader().dataset, StepSampler(2, 5, 0, 1, start_step=lambda: 3)  # resumed at step 3
    resumed = torch.stack([ds[i]["input_ids"] for i in sampler])
    assert torch.equal(resumed, first[6:])
    with pytest.raises(ValueError, match=r"acip.seq_len=9 is longer.*data.seq_len >= 9"):
        PackedTextDataModule(byte_tokenizer(), rows, seq_len=9, batch_size=2, total_steps=5).prepare()
    plain = token_rows(n=10, L=8, teacher=False)  # no teacher: the rows are concatenated and cut
    seqs = PackedTextDataModule(byte_tokenizer(), plain, seq_len=16, batch_size=2, total_steps=5).prepare()
    assert torch.equal(seqs, plain.tokens.reshape(-1)[:80].view(5, 16))
    other = TokenRows(list(rows), rows.tokens, vocab="0123456789abcdef")
    with pytest.raises(ValueError, match="another tokenizer"):
        PackedTextDataModule(byte_tokenizer(), other, seq_len=6, batch_size=2, total_steps=5).prepare()


def test_the_validation_carve_keeps_token_rows_aligned():
    from acip.train.data import validation_split

    rows = token_rows(n=20)
    rest, val = validation_split(rows, byte_tokenizer(), n_tokens=10, max_fraction=0.2, seed=0)
    assert isinstance(rest, TokenRows) and isinstance(val, TokenRows) and len(rest) + len(val) == 20
    assert not set(rest) & set(val) and len(val) >= 1
    for part in (rest, val):
        idx = [int(t.split()[1]) for t in part]
        assert torch.equal(part.tokens, rows.tokens[idx]) and torch.equal(part.teacher_ids, rows.teacher_ids[idx])
    assert validation_split(list(rows), byte_tokenizer(), 10, max_fraction=0.2, seed=0) == (list(rest), list(val))


def test_a_mixture_keeps_its_labels_through_the_validation_carve():
    import pickle

    from acip.train.data import LabeledTexts, part_windows, text_parts, validation_split

    texts = LabeledTexts([f"{k} text {i:02d} " + "z" * (i % 5) for i in range(30) for k in "ab"],
                         [k for _ in range(30) for k in "ab"])
    rest, val = validation_split(texts, byte_tokenizer(), n_tokens=60, max_fraction=0.3, seed=1)
    assert isinstance(rest, LabeledTexts) and isinstance(val, LabeledTexts) and len(rest) + len(val) == 60
    for part in (rest, val):  # every text keeps its own label
        assert all(t[0] == lab for t, lab in zip(part, part.labels))
    # the carve itself is the one of the plain texts: labelling a mixture changes no run's split
    assert validation_split(list(texts), byte_tokenizer(), 60, max_fraction=0.3, seed=1) == (list(rest), list(val))
    parts = text_parts(val)
    assert set(parts) == {"a", "b"} and sorted(parts["a"] + parts["b"]) == sorted(val)
    assert text_parts(list(val)) == {} and text_parts(LabeledTexts(["x", "y"], ["a", "a"])) == {}
    wins = part_windows(byte_tokenizer(), val, seq_len=8, max_windows=3)
    assert set(wins) == {"a", "b"} and all(w.shape[1] == 8 and 1 <= len(w) <= 3 for w in wins.values())
    notes: list[str] = []
    short = LabeledTexts(["a long enough text for two windows of eight", "b"], ["a", "b"])
    assert set(part_windows(byte_tokenizer(), short, 8, None, log=notes.append)) == {"a"}
    assert "'b'" in notes[0] and "left out" in notes[0]
    again = pickle.loads(pickle.dumps(val))  # DDP ranks receive the data module pickled
    assert isinstance(again, LabeledTexts) and again == val and again.labels == val.labels
    assert isinstance(val[1:], LabeledTexts) and val[1:].labels == val.labels[1:]
    with pytest.raises(ValueError, match="one label per text"):
        LabeledTexts(["x", "y"], ["a"])
    with pytest.raises(TypeError, match="read-only"):
        val.append("c")
