"""Text sources and the packed-sequence DataModule of a run.

Text sources (named by ``conf/data/*.yaml``) return ``(train_texts, heldout_texts)``. The
DataModule tokenizes the training texts once, concatenates them (each text followed by a
newline) and cuts the token stream into ``n = floor(T / seq_len)`` sequences.

Batch order is a pure function of ``(seed, global step, rank)``: sample ``b`` of the batch for
optimiser step ``t`` on rank ``r`` of ``w`` is the virtual index ``i = (t*w + r)*B + b``; with
``e, j = divmod(i, n)`` it reads sequence ``perm_e[j]`` where ``perm_e`` is the permutation drawn
from ``seed + e``. A resumed run therefore sees exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "kjv_texts", "text_files", "hf_dataset", "pack_tokens", "PackedSequences", "StepSampler",
    "PackedTextDataModule", "DatasetTooSmallError",
]


class DatasetTooSmallError(ValueError):
    """The training text yields fewer sequences than one (global) batch."""


def _split(texts: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction}")
    texts = [t for t in texts if t.strip()]
    cut = max(1, int(round(len(texts) * (1.0 - heldout_fraction))))
    return texts[:cut], texts[cut:] or texts[-1:]


def kjv_texts(max_train_texts: int | None = None, max_heldout_texts: int | None = None) -> tuple[list[str], list[str]]:
    """King James Bible verses, first 90% for training, last 10% held out (``acip.data.kjv_split``).

    ``max_*_texts`` keep only the first verses of each part (quick runs).
    """
    from acip.data import kjv_split

    train, heldout = kjv_split()
    return list(train)[:max_train_texts], list(heldout)[:max_heldout_texts]


def _read_text(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is an error naming it (never its bytes)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        bad = raw.find(b"\x00")  # valid UTF-8, but a binary file
        if bad < 0:
            return text
        start = bad
    except UnicodeDecodeError as e:
        start = e.start
    raise ValueError(
        f"data.paths: {str(path)!r} is not UTF-8 text (byte 0x{raw[start]:02x} at offset {start} of "
        f"{len(raw)}); data=text_files reads .txt (paragraphs split by blank lines) or .jsonl (one JSON "
        f"object with a \"text\" string per line). Convert the file, or leave it out."
    ) from None


def _jsonl_texts(path: Path, raw: str) -> list[str]:
    """Field ``text`` of every non-empty line; a bad line is an error naming the file and line."""
    import json

    out = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"data.paths: {str(path)!r} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); each line of a .jsonl "
                             f"file must be one JSON object such as {{\"text\": \"...\"}}") from None
        if not isinstance(obj, dict) or "text" not in obj:
            got = f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            raise ValueError(f"{where} has no \"text\" key ({got}); each line must be an object with a \"text\" "
                             f"string. Rename the field, or use data=hf_dataset data.text_field=<key>")
        if not isinstance(obj["text"], str):
            raise ValueError(f"{where}: \"text\" is a {type(obj['text']).__name__}, not a string")
        out.append(obj["text"])
    return out


def text_files(paths: Sequence[str], heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Plain ``.txt`` (one paragraph per blank-line block) or ``.jsonl`` (field ``text``) files.

    The last ``heldout_fraction`` of the paragraphs (in file order) is held out. Files must be
    UTF-8; a bad file or ``.jsonl`` line is an error that names the file (and line).
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("data.paths is empty: pass data.paths='[a.txt,b.txt]'")
    texts: list[str] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.paths: no file at {str(path)!r} (relative paths are taken from the current directory)")
        raw = _read_text(path)
        if path.suffix == ".jsonl":
            texts += _jsonl_texts(path, raw)
        else:
            texts += [b.strip() for b in raw.split("\n\n") if b.strip()]
    if not any(t.strip() for t in texts):
        raise ValueError(f"data.paths {list(map(str, paths))} hold no text; pass files with training text")
    return _split(texts, heldout_fraction)


def hf_dataset(
    path: str, name: str | None = None, split: str = "train", text_field: str = "text",
    heldout_fraction: float = 0.1, max_texts: int | None = None,
) -> tuple[list[str], list[str]]:
    """A Hugging Face ``datasets`` dataset (local or cached); field ``text_field`` holds the text."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data=hf_dataset needs `pip install datasets`; or use data=text_files") from e
    ds = datasets.load_dataset(path, name, split=split)
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field={text_field!r} is not a column of {path!r} (columns: {ds.column_names}); "
                         f"pass data.text_field=<column>")
    texts = ds[text_field][: max_texts or len(ds)]
    return _split(list(texts), heldout_fraction)


def pack_tokens(tokenizer: Any, texts: Sequence[str], seq_len: int, batch: int = 1024) -> torch.Tensor:
    """Tokenize ``text + "\\n"`` for every text, concatenate, cut into rows of ``seq_len`` (int64)."""
    ids: list[int] = []
    for i in range(0, len(texts), batch):
        enc = tokenizer([t + "\n" for t in texts[i : i + batch]], add_special_tokens=False)["input_ids"]
        for row in enc:
            ids.extend(row)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


class PackedSequences(Dataset):
    """Virtual, endless dataset: index ``i`` -> sequence ``perm_{i // n}[i % n]`` (module docstring)."""

    def __init__(self, sequences: torch.Tensor, seed: int) -> None:
        self.sequences = sequences
        self.seed = int(seed)
        self._perms: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(len(self.sequences), generator=g)
        return self._perms[epoch]

    def __len__(self) -> int:  # virtual length is unbounded; the sampler decides
        return 2**62

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e, j = divmod(int(i), len(self.sequences))
        return {"input_ids": self.sequences[self.perm(e)[j]]}


class StepSampler(Sampler[int]):
    """Yields the indices of steps ``start_step() .. total_steps-1`` for one rank.

    ``start_step`` is read when iteration starts, so a run restored from a checkpoint at step
    ``t`` continues with the batch of step ``t``. ``len`` is the full run, as Lightning expects
    (its epoch progress is restored together with the step).
    """

    def __init__(self, batch_size: int, total_steps: int, rank: int, world_size: int,
                 start_step: Callable[[], int] = lambda: 0) -> None:
        self.batch_size, self.total_steps = int(batch_size), int(total_steps)
        self.rank, self.world_size, self.start_step = int(rank), int(world_size), start_step

    def __iter__(self) -> Iterator[int]:
        B, w = self.batch_size, self.world_size
        for t in range(int(self.start_step()), self.total_steps):
            base = (t * w + self.rank) * B
            yield from range(base, base + B)

    def __len__(self) -> int:
        return self.total_steps * self.batch_size


class PackedTextDataModule(pl.LightningDataModule):
    """Packs ``train_texts`` into ``seq_len`` sequences; batches per :class:`StepSampler`."""

    def __init__(self, tokenizer: Any, train_texts: Sequence[str], seq_len: int, batch_size: int,
                 total_steps: int, seed: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 for next-token prediction, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer, self.train_texts = tokenizer, list(train_texts)
        self.seq_len, self.batch_size, self.total_steps = int(seq_len), int(batch_size), int(total_steps)
        self.seed, self.world_size = int(seed), int(world_size)
        self.sequences: torch.Tensor | None = None

    def prepare(self) -> torch.Tensor:
        """Tokenize and pack once; raise if the text is shorter than one global batch."""
        if self.sequences is None:
            seqs = pack_tokens(self.tokenizer, self.train_texts, self.seq_len)
            need = self.batch_size * self.world_size
            if len(seqs) < need:
                ntok = sum(len(t) for t in self.train_texts)
                raise DatasetTooSmallError(
                    f"the training text ({len(self.train_texts)} texts, ~{ntok} characters) packs into "
                    f"{len(seqs)} sequences of seq_len={self.seq_len} tokens, fewer than one batch "
                    f"(batch_size={self.batch_size} x {self.world_size} processes = {need}). Add more "
                    f"text, or lower acip.seq_len / acip.batch_size."
                )
            self.sequences = seqs
        return self.sequences

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        start = (lambda: trainer.global_step) if trainer is not None else (lambda: 0)
        sampler = StepSampler(self.batch_size, self.total_steps, rank, world, start)
        return DataLoader(PackedSequences(self.prepare(), self.seed), batch_size=self.batch_size,
                          sampler=sampler, num_workers=0)
