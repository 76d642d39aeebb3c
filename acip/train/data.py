"""Text sources and the packed-sequence DataModule of a run.

Text sources (named by ``conf/data/*.yaml``) return ``(train_texts, heldout_texts)``. The
DataModule tokenizes the training texts once, concatenates them (each text followed by a
newline) and cuts the token stream into ``n = floor(T / seq_len)`` sequences.

A source may instead return :class:`TokenRows` (``data=self_generated`` does): a list of texts
(for calibration and evaluation) that also carries the exact token rows and, optionally, the
teacher's top-k log-probabilities at every position. The DataModule then trains on those rows
themselves (no re-tokenization), so per-position targets stay aligned, and each batch carries
``teacher_ids`` / ``teacher_logp`` next to ``input_ids``.

Batch order is a pure function of ``(seed, global step, rank)``: sample ``b`` of the batch for
optimiser step ``t`` on rank ``r`` of ``w`` is the virtual index ``i = (t*w + r)*B + b``; with
``e, j = divmod(i, n)`` it reads sequence ``perm_e[j]`` where ``perm_e`` is the permutation drawn
from ``seed + e``. A resumed run therefore sees exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

__all__ = [
    "kjv_texts", "text_files", "hf_dataset", "pack_tokens", "PackedSequences", "StepSampler",
    "PackedTextDataModule", "DatasetTooSmallError", "TextStream", "PackedStream", "DatasetUnavailableError",
    "calibration_texts", "validation_split", "VALIDATION_SPLITS", "TokenRows", "vocab_digest",
    "token_rows_sequences", "LabeledTexts", "text_parts", "part_windows",
]


class _ReadOnlyTexts(list):
    """A read-only list of texts whose extra data (token rows, labels) follows each text: slicing
    gives the same type through the subclass's ``select``; mutation is refused."""

    def select(self, indices: Sequence[int]) -> "_ReadOnlyTexts":  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        return list.__getitem__(self, i)

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is read-only (its extra data follows its texts); list(texts) is a "
                        f"plain copy")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only


class LabeledTexts(_ReadOnlyTexts):
    """Texts that remember which part of the training data each came from: ``self[i]`` is a text,
    ``labels[i]`` the name of its part (``data=mix`` labels every text with its component's name).

    As a list it is the texts, so everything that reads texts reads it unchanged; :meth:`select`
    (a validation carve) keeps the labels with their texts, and :func:`text_parts` groups them.
    The validation split of a mixture is then measured part by part, so the adapters are chosen
    for every kind of training text, not for whichever kind holds the most tokens
    (:mod:`acip.export.auto`).
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[str]) -> None:
        texts, labels = list(texts), [str(x) for x in labels]
        if len(texts) != len(labels):
            raise ValueError(f"LabeledTexts: one label per text, got {len(labels)} labels for {len(texts)} texts")
        super().__init__(texts)
        self.labels = labels

    def select(self, indices: Sequence[int]) -> "LabeledTexts":
        """The texts ``indices`` (in that order) with their labels."""
        idx = [int(i) for i in indices]
        if idx and (min(idx) < 0 or max(idx) >= len(self)):
            raise IndexError(f"LabeledTexts.select: indices must be in [0, {len(self)}), got {min(idx)}..{max(idx)}")
        return LabeledTexts([list.__getitem__(self, i) for i in idx], [self.labels[i] for i in idx])

    def __reduce__(self) -> Any:
        return (LabeledTexts, (list(self), self.labels))

    def __repr__(self) -> str:
        counts = {k: self.labels.count(k) for k in dict.fromkeys(self.labels)}
        return f"LabeledTexts({len(self)} texts: {counts})"


def text_parts(texts: Sequence[str]) -> dict[str, list[str]]:
    """``{label: texts}`` of :class:`LabeledTexts` (labels in order of first appearance, texts in
    their order); ``{}`` for plain texts or texts of a single part (nothing to tell apart)."""
    if not isinstance(texts, LabeledTexts):
        return {}
    parts: dict[str, list[str]] = {}
    for t, lab in zip(texts, texts.labels):
        parts.setdefault(lab, []).append(t)
    return parts if len(parts) > 1 else {}


def part_windows(tokenizer: Any, texts: Sequence[str], seq_len: int, max_windows: int | None,
                 log: Callable[[str], Any] | None = print) -> dict[str, torch.Tensor]:
    """``{label: windows}``: :func:`acip.eval.perplexity.token_windows` of each part of
    :class:`LabeledTexts` on its own (at most ``max_windows`` windows each). ``{}`` for plain texts
    or a single part; a part too short for one window of ``seq_len`` tokens is left out, with a note
    (it then has no say in what the parts choose)."""
    from acip.eval.perplexity import token_windows

    out: dict[str, torch.Tensor] = {}
    for name, part in text_parts(texts).items():
        try:
            out[name] = token_windows(tokenizer, part, seq_len, max_windows)
        except ValueError:
            if log:
                log(f"[acip] validation part {name!r}: {len(part)} text(s), fewer tokens than one window of "
                    f"{seq_len}; left out of the per-part comparison")
    return out


class DatasetTooSmallError(ValueError):
    """The training text yields fewer sequences than one (global) batch."""


def vocab_digest(tokenizer: Any) -> str:
    """sha256 (16 hex digits) of the tokenizer's vocabulary: token rows are only valid for this vocabulary."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


class TokenRows(_ReadOnlyTexts):
    """Training rows as exact tokens: a read-only list of their texts that carries the tensors.

    - ``tokens``: ``(N, L)`` int64, row ``i`` is the token sequence whose text is ``self[i]``;
    - ``teacher_ids`` / ``teacher_logp``: ``(N, L, K)`` (int64 / float) or None: at position ``t``
      of row ``i``, the ``K`` most likely next tokens of the teacher and their log-probabilities
      ``log p(x_{t+1} = id | x_{<=t})`` (untempered, before any sampling filter);
    - ``vocab``: :func:`vocab_digest` of the tokenizer the ids belong to.

    As a list it is the texts (calibration, evaluation, ``data=mix`` use those); slicing, or
    :meth:`select` with row indices (a validation carve), gives a ``TokenRows`` of those rows.
    """

    def __init__(self, texts: Sequence[str], tokens: torch.Tensor, teacher_ids: torch.Tensor | None = None,
                 teacher_logp: torch.Tensor | None = None, vocab: str | None = None) -> None:
        texts = list(texts)
        if tokens.dim() != 2 or len(tokens) != len(texts):
            raise ValueError(f"TokenRows: tokens must be (rows, seq_len) with one row per text; got "
                             f"{tuple(tokens.shape)} for {len(texts)} texts")
        if (teacher_ids is None) != (teacher_logp is None):
            raise ValueError("TokenRows: teacher_ids and teacher_logp come together (both or neither)")
        if teacher_ids is not None and (teacher_ids.shape != teacher_logp.shape
                                        or teacher_ids.shape[:2] != tokens.shape):
            raise ValueError(f"TokenRows: teacher_ids {tuple(teacher_ids.shape)} and teacher_logp "
                             f"{tuple(teacher_logp.shape)} must both be (rows, seq_len, K) for tokens "
                             f"{tuple(tokens.shape)}")
        super().__init__(texts)

        def normal(t: torch.Tensor | None) -> torch.Tensor | None:  # a sampler's inference tensors cannot meet autograd
            return t.clone() if t is not None and t.is_inference() else t

        self.tokens = normal(tokens.long())
        self.teacher_ids = None if teacher_ids is None else normal(teacher_ids.long())
        self.teacher_logp = normal(teacher_logp)
        self.vocab = vocab

    @property
    def has_teacher(self) -> bool:
        return self.teacher_ids is not None

    def select(self, indices: Sequence[int] | torch.Tensor) -> "TokenRows":
        """The rows ``indices`` (in that order), texts and tensors together."""
        idx = torch.as_tensor(indices if isinstance(indices, torch.Tensor) else list(indices), dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"TokenRows.select: row indices must be in [0, {len(self)}), got "
                             f"{int(idx.min())}..{int(idx.max())}")

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return TokenRows([list.__getitem__(self, int(i)) for i in idx], self.tokens[idx], pick(self.teacher_ids),
                         pick(self.teacher_logp), self.vocab)

    def __reduce__(self) -> Any:
        return (TokenRows, (list(self), self.tokens, self.teacher_ids, self.teacher_logp, self.vocab))

    def __repr__(self) -> str:
        k = f", teacher top-{self.teacher_ids.shape[-1]}" if self.has_teacher else ""
        return f"TokenRows({len(self)} rows x {self.tokens.shape[1]} tokens{k})"


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


VALIDATION_SPLITS = ("validation", "valid", "val", "test")  # the dataset's own held-out split, first found


class DatasetUnavailableError(ConnectionError):
    """A hub dataset could not be opened (no network, no HF cache): the message names a local copy's options."""


class TextStream:
    """Training texts of a ``datasets`` dataset, read lazily in order: never materialised.

    ``texts(epoch)`` re-opens the split (``open_split()``), skips the first ``skip`` rows (held out),
    shuffles with a buffer of ``shuffle_buffer`` texts (seed ``seed + epoch``; 0 = file order) and
    yields the non-empty ``text_field`` strings, at most ``max_texts`` per epoch. ``token_budget``
    (tokens per epoch; None = the whole split) is applied by :class:`PackedStream`. ``rows_read``
    counts the rows taken from the dataset (a shuffle buffer reads ``shuffle_buffer`` rows ahead).
    """

    def __init__(self, open_split: Callable[[], Any], text_field: str = "text", token_budget: int | None = None,
                 shuffle_buffer: int = 0, seed: int = 0, skip: int = 0, max_texts: int | None = None,
                 where: str = "the dataset") -> None:
        if token_budget is not None and (isinstance(token_budget, bool) or int(token_budget) < 1):
            raise ValueError(f"data.token_budget must be a positive number of tokens or null, got {token_budget!r}")
        if int(shuffle_buffer) < 0:
            raise ValueError(f"data.shuffle_buffer must be >= 0 texts (0 = file order), got {shuffle_buffer!r}")
        self.open_split, self.text_field, self.where = open_split, text_field, where
        self.token_budget = None if token_budget is None else int(token_budget)
        self.shuffle_buffer, self.seed, self.skip = int(shuffle_buffer), int(seed), int(skip)
        self.max_texts = max_texts
        self.rows_read = 0

    def texts(self, epoch: int = 0) -> Iterator[str]:
        ds = self.open_split()
        if self.skip:
            ds = ds.skip(self.skip)
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed + int(epoch), buffer_size=self.shuffle_buffer)
        n = 0
        for row in ds:
            self.rows_read += 1
            if self.text_field not in row:
                raise ValueError(f"data.text_field={self.text_field!r} is not a column of {self.where} (columns: "
                                 f"{sorted(row)}); pass data.text_field=<column>")
            t = row[self.text_field]
            if isinstance(t, str) and t.strip():
                yield t
                n += 1
                if self.max_texts is not None and n >= self.max_texts:
                    return

    def __iter__(self) -> Iterator[str]:
        return self.texts(0)

    def split_head(self, tokenizer: Any, n_tokens: int) -> tuple["TextStream", list[str]]:
        """``(rest, head)``: the first texts (file order, after ``skip``) holding ``n_tokens`` tokens,
        and a copy of this stream that skips the rows they came from (the validation split)."""
        import copy

        ds, out, have, rows = self.open_split(), [], 0, 0
        if self.skip:
            ds = ds.skip(self.skip)
        for row in ds:
            rows += 1
            t = row.get(self.text_field)
            if isinstance(t, str) and t.strip():
                out.append(t)
                have += len(tokenizer(t + "\n", add_special_tokens=False)["input_ids"])
                if have >= n_tokens:
                    break
        if not out:
            raise ValueError(f"{self.where} gave no texts for the validation split (column {self.text_field!r})")
        rest = copy.copy(self)
        rest.skip, rest.rows_read = self.skip + rows, 0
        return rest, out

    def head(self, tokenizer: Any, n_tokens: int) -> list[str]:
        """The first texts of epoch 0 that hold at least ``n_tokens`` tokens (calibration samples)."""
        out, have = [], 0
        for t in self.texts(0):
            out.append(t)
            have += len(tokenizer(t + "\n", add_special_tokens=False)["input_ids"])
            if have >= n_tokens:
                break
        return out


def validation_split(texts: Any, tokenizer: Any, n_tokens: int, *, max_fraction: float = 0.1,
                     seed: int = 0) -> tuple[Any, list[str]]:
    """Set the validation split aside from the *training* texts: ``(train_rest, val_texts)``.

    A list: a seeded random subset (``random.Random(seed)``; kept in text order) whose texts hold at
    least ``n_tokens`` tokens, but at most ``max_fraction`` of the texts (and at least one, leaving at
    least one). Drawn at random rather than from the end, so a mixture (``data=mix``) or a text in
    book order gives a validation split with the training data's distribution. A
    :class:`TextStream`: its first texts holding ``n_tokens`` tokens, and a stream that skips them.
    :class:`TokenRows`: the same subset of rows, both parts ``TokenRows`` (:meth:`TokenRows.select`);
    :class:`LabeledTexts` (a mixture): the same subset, both parts keep their labels.
    The run trains on ``train_rest`` only; the validation split chooses settings (the adapters per
    ratio, the sweep's metric), the held-out split only measures.
    """
    import random

    if not 0.0 < float(max_fraction) < 1.0:
        raise ValueError(f"eval.val_max_fraction={max_fraction!r}: the share of the training texts set aside for "
                         f"validation must be in (0, 1)")
    if int(n_tokens) < 1:
        raise ValueError(f"the validation split needs n_tokens >= 1, got {n_tokens!r} (eval.val_windows x eval.seq_len)")
    if isinstance(texts, TextStream):
        return texts.split_head(tokenizer, int(n_tokens))
    rows, texts = texts, list(texts)
    if len(texts) < 2:
        raise ValueError(f"the training data holds {len(texts)} text(s); setting a validation split aside needs at "
                         f"least 2 (more data, or eval.enabled=false for a run without a final evaluation)")
    cap = min(len(texts) - 1, max(1, int(len(texts) * float(max_fraction))))
    order = list(range(len(texts)))
    random.Random(int(seed)).shuffle(order)
    picked, have = [], 0
    for i in order[:cap]:
        picked.append(i)
        have += len(tokenizer(texts[i] + "\n", add_special_tokens=False)["input_ids"])
        if have >= n_tokens:
            break
    chosen = set(picked)
    if isinstance(rows, (TokenRows, LabeledTexts)):  # the tensors / labels stay with their texts
        return rows.select([i for i in range(len(rows)) if i not in chosen]), rows.select(sorted(chosen))
    return [t for i, t in enumerate(texts) if i not in chosen], [texts[i] for i in sorted(chosen)]


def calibration_texts(texts: Any, tokenizer: Any, n_tokens: int) -> Sequence[str]:
    """``texts`` itself when it is a list; the first texts of a :class:`TextStream` holding ``n_tokens``."""
    return texts.head(tokenizer, n_tokens) if isinstance(texts, TextStream) else texts


def _open_dataset(datasets: Any, path: str, name: str | None, data_files: Any, data_dir: str | None,
                  streaming: bool) -> Any:
    """``load_dataset`` of every split (a dict), with one clear error when it cannot be opened."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(data_files):
        data_files = OmegaConf.to_container(data_files, resolve=True)
    try:
        return datasets.load_dataset(path, name, data_files=data_files, data_dir=data_dir, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; one message names the way out
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if Path(path).expanduser().exists() or path in ("json", "parquet", "csv", "text", "arrow"):
            raise ValueError(f"data.path={path!r}: could not read the dataset ({type(e).__name__}: {first}). Check "
                             f"data.data_files / data.data_dir") from None
        raise DatasetUnavailableError(
            f"could not open the hub dataset {path!r}{f' ({name})' if name else ''}: {type(e).__name__}: {first}. "
            f"Without network (or a filled HF cache) point it at a local copy: data.path=/data/c4 "
            f"data.data_files='{{train: en/c4-train.*.json.gz, validation: en/c4-validation.*.json.gz}}' "
            f"(any local json/parquet files: data.path=json or data.path=parquet with data.data_files=...)"
        ) from None


def hf_dataset(
    path: str, name: str | None = None, split: str = "train", text_field: str = "text",
    heldout_fraction: float = 0.1, max_texts: int | None = None, streaming: bool = False,
    token_budget: int | None = None, validation_split: str | None = "auto", max_heldout_texts: int = 2000,
    shuffle_buffer: int = 0, seed: int = 0, data_files: Any = None, data_dir: str | None = None,
) -> tuple[Any, list[str]]:
    """A Hugging Face ``datasets`` dataset (hub id, local directory, or ``json``/``parquet`` + ``data_files``).

    Held out: the dataset's own validation split when it has one (``validation_split="auto"``: the
    first of :data:`VALIDATION_SPLITS`; a name; or null), its first ``max_heldout_texts`` texts.
    Without one, a list dataset holds out its last ``heldout_fraction``; a stream its first
    ``max_heldout_texts`` texts (skipped for training).

    ``streaming=True`` or a ``token_budget`` give the training texts as a :class:`TextStream`
    (packed on the fly by :class:`PackedStream`, with a shuffle buffer of ``shuffle_buffer`` texts);
    otherwise a list, as before.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data=hf_dataset needs `pip install datasets` (or pip install 'acip[data]'); "
                          "or use data=text_files") from e
    dd = _open_dataset(datasets, path, name, data_files, data_dir, bool(streaming))
    splits = list(dd)
    if split not in splits:
        raise ValueError(f"data.split={split!r} is not a split of {path!r} (splits: {splits}); pass data.split=<name>")
    if validation_split == "auto":
        val = next((v for v in VALIDATION_SPLITS if v in splits and v != split), None)
    elif validation_split in (None, "null", "none", ""):
        val = None
    elif validation_split not in splits:
        raise ValueError(f"data.validation_split={validation_split!r} is not a split of {path!r} (splits: {splits}); "
                         f"pass one of them, auto, or null")
    else:
        val = validation_split
    where = f"{path!r} split {split!r}"
    lazy = bool(streaming) or token_budget is not None
    if not lazy:  # a (memory-mapped) Dataset: the texts as a list, as before
        ds = dd[split]
        if text_field not in ds.column_names:
            raise ValueError(f"data.text_field={text_field!r} is not a column of {path!r} (columns: {ds.column_names}); "
                             f"pass data.text_field=<column>")
        texts = list(ds[text_field][: max_texts or len(ds)])
        if val is None:
            return _split(texts, heldout_fraction)
        held = dd[val][text_field][:max_heldout_texts]
        return [t for t in texts if t and t.strip()], [t for t in held if t and t.strip()]

    def opener(which: str) -> Callable[[], Any]:
        ds = dd[which]
        return (lambda: ds) if streaming else (lambda: ds.to_iterable_dataset())

    n_held = int(max_heldout_texts)
    if val is not None:
        held = list(itertools.islice(TextStream(opener(val), text_field, where=f"{path!r} split {val!r}"), n_held))
        train = TextStream(opener(split), text_field, token_budget, shuffle_buffer, seed, 0, max_texts, where)
    else:  # no validation split: hold out the stream's first texts, train on the rest
        first = TextStream(opener(split), text_field, where=where)
        held = []
        for t in first.texts(0):
            held.append(t)
            if len(held) >= n_held:
                break
        train = TextStream(opener(split), text_field, token_budget, shuffle_buffer, seed, first.rows_read, max_texts,
                           where)
    if not held:
        raise ValueError(f"{path!r} gave no held-out texts (split {val or split!r}); raise data.max_heldout_texts or "
                         f"pass data.validation_split=<split>")
    return train, held


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
    """Virtual, endless dataset: index ``i`` -> sequence ``perm_{i // n}[i % n]`` (module docstring).

    ``extras`` (e.g. ``teacher_ids`` / ``teacher_logp``, one row per sequence) come with their row."""

    def __init__(self, sequences: torch.Tensor, seed: int, extras: dict[str, torch.Tensor] | None = None) -> None:
        self.sequences = sequences
        self.seed = int(seed)
        self.extras = dict(extras or {})
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
        row = int(self.perm(e)[j])
        return {"input_ids": self.sequences[row], **{k: v[row] for k, v in self.extras.items()}}


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


class PackedStream(IterableDataset):
    """Packs a :class:`TextStream` on the fly: tokenize ``text + "\\n"``, concatenate, cut ``seq_len`` rows.

    Rows are numbered across epochs (epoch ``e`` re-reads the stream, shuffled with ``seed + e``,
    up to ``token_budget`` tokens); row ``i`` belongs to step ``t, rem = divmod(i, w*B)`` and rank
    ``rem // B``, so, as for lists, the batch of step ``t`` is a pure function of (seed, t, rank).
    Every rank reads the stream and keeps its own rows; a run resumed at step ``t`` re-reads (and
    drops) the rows of the steps before ``t``.
    """

    def __init__(self, stream: TextStream, tokenizer: Any, seq_len: int, batch_size: int, total_steps: int,
                 rank: int = 0, world_size: int = 1, start_step: Callable[[], int] = lambda: 0,
                 chunk: int = 16) -> None:
        self.stream, self.tokenizer, self.seq_len = stream, tokenizer, int(seq_len)
        self.batch_size, self.total_steps = int(batch_size), int(total_steps)
        self.rank, self.world_size, self.start_step, self.chunk = int(rank), int(world_size), start_step, int(chunk)

    def rows(self, epoch: int) -> Iterator[torch.Tensor]:
        """The packed rows of one epoch (at most ``token_budget // seq_len`` of them)."""
        budget = self.stream.token_budget
        limit = None if budget is None else budget // self.seq_len
        buf: list[int] = []
        n = 0
        texts = self.stream.texts(epoch)
        while limit is None or n < limit:
            batch = list(itertools.islice(texts, self.chunk if limit is None else min(self.chunk, limit - n)))
            if not batch:
                return
            for row in self.tokenizer([t + "\n" for t in batch], add_special_tokens=False)["input_ids"]:
                buf.extend(row)
            while len(buf) >= self.seq_len and (limit is None or n < limit):
                yield torch.tensor(buf[: self.seq_len], dtype=torch.long)
                del buf[: self.seq_len]
                n += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        B, w = self.batch_size, self.world_size
        start, i, epoch = int(self.start_step()), 0, 0
        while True:
            got = 0
            for row in self.rows(epoch):
                got += 1
                t, rem = divmod(i, w * B)
                i += 1
                if t >= self.total_steps:
                    return
                if t >= start and rem // B == self.rank:
                    yield {"input_ids": row}
            if got == 0:
                raise DatasetTooSmallError(f"{self.stream.where} packs into no sequence of seq_len={self.seq_len}")
            epoch += 1


def token_rows_sequences(rows: TokenRows, seq_len: int, tokenizer: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training sequences of :class:`TokenRows`: ``(sequences, extras)``, tokens used as they are.

    Without a teacher the rows are concatenated and cut into ``seq_len`` rows (as packing does, but
    token-exact). With one, every row is cut to its first ``seq_len`` tokens, so the teacher's
    distribution at each kept position sees exactly the context the student sees; rows shorter
    than ``seq_len`` are then an error. ``tokenizer``: checked against ``rows.vocab``.
    """
    if tokenizer is not None and rows.vocab is not None and vocab_digest(tokenizer) != rows.vocab:
        raise ValueError("the token rows of the data group were made with another tokenizer than the run's model "
                         "(vocabulary digests differ): sample them with the run's own model (data.model=${model})")
    if not rows.has_teacher:
        flat = rows.tokens.reshape(-1)
        n = len(flat) // seq_len
        return flat[: n * seq_len].view(n, seq_len), {}
    L = rows.tokens.shape[1]
    if seq_len > L:
        raise ValueError(f"acip.seq_len={seq_len} is longer than the data's token rows ({L} tokens, data.seq_len) "
                         f"that carry the teacher's top-k: set data.seq_len >= {seq_len}, or data.teacher_topk=0")
    if seq_len < L:
        import warnings

        warnings.warn(f"acip.seq_len={seq_len} is shorter than the data's token rows ({L} tokens) that carry the "
                      f"teacher's top-k: each row trains on its first {seq_len} tokens only; sample rows of "
                      f"data.seq_len={seq_len} to use every sampled token")
    return rows.tokens[:, :seq_len], {"teacher_ids": rows.teacher_ids[:, :seq_len],
                                      "teacher_logp": rows.teacher_logp[:, :seq_len]}


class PackedTextDataModule(pl.LightningDataModule):
    """Packs ``train_texts`` into ``seq_len`` sequences; batches per :class:`StepSampler`.

    :class:`TokenRows` are used as they are (:func:`token_rows_sequences`), with their teacher top-k."""

    def __init__(self, tokenizer: Any, train_texts: Sequence[str], seq_len: int, batch_size: int,
                 total_steps: int, seed: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 for next-token prediction, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.train_texts = train_texts if isinstance(train_texts, (TextStream, TokenRows)) else list(train_texts)
        self.seq_len, self.batch_size, self.total_steps = int(seq_len), int(batch_size), int(total_steps)
        self.seed, self.world_size = int(seed), int(world_size)
        self.sequences: torch.Tensor | None = None
        self.extras: dict[str, torch.Tensor] = {}

    def stream(self, rank: int = 0, world: int = 1, start: Callable[[], int] = lambda: 0) -> PackedStream:
        return PackedStream(self.train_texts, self.tokenizer, self.seq_len, self.batch_size, self.total_steps,
                            rank, world, start)

    def prepare(self) -> torch.Tensor | None:
        """Tokenize and pack once; raise if the text is shorter than one global batch.

        A :class:`TextStream` is not packed here (None): only its first global batch is read, as a check."""
        if isinstance(self.train_texts, TextStream):
            need = self.batch_size * self.world_size
            got = sum(1 for _ in itertools.islice(self.stream().rows(0), need))
            if got < need:
                raise DatasetTooSmallError(
                    f"{self.train_texts.where} packs into {got} sequences of seq_len={self.seq_len} tokens "
                    f"(token_budget={self.train_texts.token_budget}), fewer than one batch (batch_size="
                    f"{self.batch_size} x {self.world_size} processes = {need}). Raise data.token_budget, or lower "
                    f"acip.seq_len / acip.batch_size."
                )
            return None
        if self.sequences is None:
            if isinstance(self.train_texts, TokenRows):
                seqs, self.extras = token_rows_sequences(self.train_texts, self.seq_len, self.tokenizer)
            else:
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
        if isinstance(self.train_texts, TextStream):
            return DataLoader(self.stream(rank, world, start), batch_size=self.batch_size, num_workers=0)
        sampler = StepSampler(self.batch_size, self.total_steps, rank, world, start)
        return DataLoader(PackedSequences(self.prepare(), self.seed, self.extras), batch_size=self.batch_size,
                          sampler=sampler, num_workers=0)
