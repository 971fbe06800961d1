"""Getting parameters in and out of files: safetensors, which cannot hold
code, and the training checkpoints gpt2fn writes (``.pt``), read by
``torch.load(weights_only=True)``, which builds tensors and plain data only
(from torch 2.10, whose loader has no known hole; before, they are refused).
A pickle is never unpickled.

* :func:`load_pretrained` takes a Hugging Face hub name (gpt2, gpt2-medium,
  gpt2-large, gpt2-xl, or an ``owner/repo`` id), a local directory in the
  Hugging Face layout (``config.json`` + ``model.safetensors``, possibly
  sharded), a ``.safetensors`` file (the project's own format, or a Hugging
  Face file with ``config.json`` beside it), or a training checkpoint
  (``scripts/train.py --out``'s ``.pt``: its weights, as at its last step;
  or nanoGPT's ``ckpt.pt``, build-nanogpt's: :func:`params_from_nanogpt`), or a model file of
  llm.c (``gpt2_124M.bin``: :func:`load_llmc`).
* :func:`save_params` / :func:`load_params` are the project's own format: the
  flattened params dict with the config in the file's metadata, so a converted
  or trained model is one self-describing file (kept under ``weights/``).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gpt2fn.config import PRESETS, GPTConfig
from gpt2fn.device import resolve_device
from gpt2fn.errors import GPT2FnError
from gpt2fn.files import atomic_write, write_json
from gpt2fn.params import Params, flatten_params, map_params, param_shapes, params_device, unflatten_params
from gpt2fn.quantize import quantize_int8
from gpt2fn.training import checkpoint_state, other_project, read_pt

# Hugging Face repositories of the four released sizes.
HUB_REPOS: dict[str, str] = {name: f"openai-community/{name}" for name in PRESETS}
# Files a snapshot needs: weights, config, and the tokenizer as vocab.json +
# merges.txt, or tokenizer.json alone (what transformers 5 saves).
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.json", "merges.txt", "tokenizer.json"]
CONFIG_METADATA_KEY = "gpt2fn_config"
# Models that ship with the project (weights/NAME.safetensors) load by NAME.
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "weights"
# torch.load(weights_only=True) has no known hole that lets a file run code from torch 2.10 on
# (CVE-2025-32434, fixed in 2.6; CVE-2026-24747, fixed in 2.10): .pt models load from there.
SAFE_TORCH_LOAD = torch.torch_version.TorchVersion(torch.__version__) >= "2.10"
# What --model takes, in every script's --help (resolve_model).
MODEL_HELP = (f"{', '.join(HUB_REPOS)} (from the Hub), a model in weights/ by name (gpt2-shakespeare), "
              "a Hub id owner/repo, a checkpoint directory, a .safetensors file, a training checkpoint (.pt: "
              "train.py's, nanoGPT's or build-nanogpt's), or an llm.c model file (.bin)")
REVISION_HELP = "the Hub revision (branch, tag or commit) of a Hub model (default: main)"


# ----------------------------------------------------------------------------- finding files


def resolve_model(name_or_path: str | os.PathLike, revision: Optional[str] = None) -> Path:
    """A local file or directory holding the model: the path itself if it
    exists, a bundled model (``weights/NAME.safetensors``) by name, else a
    snapshot downloaded from (or already cached from) the Hub.

    Downloads go to huggingface_hub's normal cache (``HF_HOME``/``HF_HUB_CACHE``),
    with its progress bars; ``HF_HUB_OFFLINE=1`` uses the cache only.
    A ``revision`` (branch, tag or commit) picks a Hub snapshot: with a local
    or bundled model, which has none, this raises.
    """
    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    bundled = BUNDLED_DIR / f"{name}.safetensors"
    local = path if path.exists() else bundled if "/" not in name and bundled.is_file() else None
    if local is not None:  # a path, or a model that ships with the project, by name
        if revision is not None:
            raise GPT2FnError(f"revision {revision!r} picks a Hub snapshot, but {name} is the local "
                              f"{'file' if local.is_file() else 'directory'} {local}; drop the revision")  # fmt: skip
        return local
    if name.startswith((".", "/", "~")) or name.endswith((".safetensors", ".pt", ".bin")) or name.count("/") > 1:
        raise GPT2FnError(f"{name} does not exist; pass an existing checkpoint directory, .safetensors file, "
                          "training checkpoint (.pt) or llm.c model file (.bin)")
    if name in HUB_REPOS:
        repo_id = HUB_REPOS[name]
    elif name.count("/") == 1:
        repo_id = name  # an explicit "owner/repo" on the Hub
    else:
        raise GPT2FnError(
            f"unknown model {name!r}: use one of {', '.join(HUB_REPOS)}, a Hub id 'owner/repo', "
            "a directory with config.json + model.safetensors, or a .safetensors file"
        )
    return Path(_download_snapshot(repo_id, revision))


def _download_snapshot(repo_id: str, revision: Optional[str]) -> str:
    from huggingface_hub import constants

    cached = _cached_snapshot(repo_id, revision)
    if cached is not None and (constants.HF_HUB_OFFLINE or _is_commit(revision)):
        return cached  # offline the cache is all there is; a commit's files never change
    if constants.HF_HUB_OFFLINE:
        raise _not_cached(repo_id, revision, "model")
    return _snapshot(repo_id, revision, HUB_FILES, "model")


def _snapshot(repo_id: str, revision: Optional[str], patterns: list[str], repo_type: str) -> str:
    """huggingface_hub's ``snapshot_download``, its errors each one line."""
    # These names exist in every huggingface_hub that setup.cfg admits (0.23 to 2.x).
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns)
    except RevisionNotFoundError:
        raise GPT2FnError(f"the Hub {repo_type} {repo_id} has no revision {revision!r}; check the name") from None
    except RepositoryNotFoundError:
        raise GPT2FnError(f"the Hub has no {repo_type} {repo_id!r} (or it is private); check the name") from None
    except LocalEntryNotFoundError:
        raise _not_cached(repo_id, revision, repo_type) from None
    except OSError as e:  # network failures surface as OSError subclasses
        raise GPT2FnError(f"could not download the {repo_type} {repo_id} from the Hub: {_one_line(e)}") from None


def _not_cached(repo_id: str, revision: Optional[str], repo_type: str) -> GPT2FnError:
    return GPT2FnError(
        f"{repo_id}{f' at revision {revision}' if revision else ''} is not in the local Hugging Face cache and the Hub "
        "cannot be reached (offline or HF_HUB_OFFLINE=1); connect once to download it, point HF_HOME at a cache that "
        f"has it, or pass {'a local directory' if repo_type == 'model' else 'local files'}"
    )


def hub_dataset_files(repo_id: str, subset: Optional[str] = None, revision: Optional[str] = None,
                      split: str = "train") -> list[Path]:  # fmt: skip
    """The parquet files of a split of a Hub dataset, downloaded once into
    huggingface_hub's cache (``HF_HUB_OFFLINE=1``: from the cache).
    ``subset`` is a config name of the dataset card (``sample-10BT`` of
    ``HuggingFaceFW/fineweb-edu``, whose files are ``sample/10BT/*``;
    ``wikitext-2-raw-v1`` of ``Salesforce/wikitext``) or a folder; without it,
    the default config. A folder the card does not name is all train split;
    another split there is its ``SPLIT-*.parquet`` or ``SPLIT/*.parquet``."""
    import fnmatch

    card = Path(_snapshot(repo_id, revision, ["README.md"], "dataset")) / "README.md"
    patterns = _subset_patterns(card, subset, split)
    snapshot = Path(_snapshot(repo_id, revision, patterns, "dataset"))
    files = sorted(p for p in snapshot.rglob("*.parquet")
                   if any(fnmatch.fnmatch(p.relative_to(snapshot).as_posix(), pat) for pat in patterns))  # fmt: skip
    if not files:
        raise GPT2FnError(f"the Hub dataset {repo_id}{f' subset {subset}' if subset else ''} has no {split} parquet "
                          f"files matching {patterns}")  # fmt: skip
    return files


def _subset_patterns(card: Path, subset: Optional[str], split: str = "train") -> list[str]:
    """File patterns of ``split`` of ``subset`` (or the default config) from
    the dataset card's YAML ``configs``; a subset the card does not name is a
    folder."""
    import yaml

    configs = []
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        if text.startswith("---"):
            header = yaml.safe_load(text.split("---")[1]) or {}
            configs = header.get("configs") or [] if isinstance(header, dict) else []
    wanted = subset or "default"
    for config in configs:
        if isinstance(config, dict) and config.get("config_name") == wanted:
            files = config.get("data_files") or []
            files = [files] if isinstance(files, (str, dict)) else files
            splits = [f.get("split", "train") if isinstance(f, dict) else "train" for f in files]
            chosen = [f for f, name in zip(files, splits) if name == split]
            if not chosen:
                raise GPT2FnError(f"the dataset's config {wanted} has no {split} split; it has "
                                  f"{', '.join(sorted(set(splits))) or 'no files'}")  # fmt: skip
            paths = [f["path"] if isinstance(f, dict) else f for f in chosen]
            patterns = [p for path in paths for p in ([path] if isinstance(path, str) else path)]
            return [p if p.endswith(".parquet") else p.rstrip("*") + "*.parquet" for p in patterns]
    folder = f"{subset}/" if subset else ""
    return [f"{folder}*.parquet"] if split == "train" else [f"{folder}{split}-*.parquet", f"{folder}{split}/*.parquet"]


def _is_commit(revision: Optional[str]) -> bool:
    return revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _cached_snapshot(repo_id: str, revision: Optional[str]) -> Optional[str]:
    """The snapshot directory of ``repo_id`` at ``revision`` (a branch, tag or
    commit; default main) in huggingface_hub's cache, if it holds a config and
    weights; found with huggingface_hub's own ``try_to_load_from_cache``."""
    from huggingface_hub import constants, try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=constants.HF_HUB_CACHE, revision=revision)
    if not isinstance(config, str):  # None (unknown) or the "known missing" sentinel
        return None
    snapshot = Path(config).parent
    has_weights = (snapshot / "model.safetensors").is_file() or (snapshot / "model.safetensors.index.json").is_file()
    return str(snapshot) if has_weights else None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ----------------------------------------------------------------------------- reading safetensors


def _read_safetensors(path: Path, keep=lambda name: True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (that ``keep`` accepts) and the metadata of one file."""
    if not path.is_file():
        raise GPT2FnError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys() if keep(name)}
    except SafetensorError as e:
        raise GPT2FnError(
            f"{path} is not a valid safetensors file ({_one_line(e)}); it may be truncated or corrupt: "
            "download or save it again"
        ) from None
    return tensors, metadata


def _hf_weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    if (directory / "pytorch_model.bin").exists():
        raise GPT2FnError(
            f"{directory} has only pytorch_model.bin (a pickle, which gpt2fn never loads); "
            "convert it to model.safetensors first"
        )
    raise GPT2FnError(f"{directory} has no model.safetensors; it is not a Hugging Face GPT-2 checkpoint")


def read_hf_config(directory: Path) -> GPTConfig:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise GPT2FnError(f"{directory} has no config.json; a Hugging Face checkpoint needs one beside its weights")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GPT2FnError(f"{config_path} is not valid JSON ({_one_line(e)})") from None
    return GPTConfig.from_hf(hf)


# ----------------------------------------------------------------------------- Hugging Face layout


def _hf_is_buffer(name: str) -> bool:
    # the causal-mask buffers some checkpoints carry; not parameters
    return name.endswith((".attn.bias", ".attn.masked_bias"))


def hf_name(name: str) -> str:
    """Our dotted name -> the Hugging Face one (without ``transformer.``):
    ``blocks.3.attn.c_attn.w`` -> ``h.3.attn.c_attn.weight``, ``wte`` -> ``wte.weight``."""
    if name in ("wte", "wpe"):
        return name + ".weight"
    *path, leaf = name.removeprefix("blocks.").split(".")
    prefix = "h." if name.startswith("blocks.") else ""
    return prefix + ".".join(path) + {"w": ".weight", "g": ".weight", "b": ".bias"}[leaf]


def _is_conv1d(name: str) -> bool:
    # every linear weight of GPT-2 is a Conv1D in the reference: stored [in, out]
    return name.endswith(".w")


def params_from_hf(state: dict[str, torch.Tensor], config: GPTConfig, conv1d: bool = True) -> Params:
    """Map a Hugging Face GPT-2 state dict (``GPT2LMHeadModel`` or
    ``GPT2Model`` names, with or without the ``transformer.`` prefix, with or
    without the attention-mask buffers) to the params dict. Its linear
    weights are Conv1D's ``[in, out]``; with ``conv1d=False``, ``nn.Linear``'s
    ``[out, in]`` (nanoGPT's GPT, which takes the same names)."""
    state = {k.removeprefix("transformer."): v for k, v in state.items() if not _hf_is_buffer(k)}
    lm_head = state.pop("lm_head.weight", None)
    shapes = param_shapes(config)
    transposed = {n for n in shapes if conv1d and _is_conv1d(n)}
    _check_names_and_shapes(state, {hf_name(n): (s[::-1] if n in transposed else s) for n, s in shapes.items()})
    if lm_head is not None and not torch.equal(lm_head, state["wte.weight"]):
        raise GPT2FnError("the checkpoint's lm_head differs from wte (untied); gpt2fn's LM head is tied to wte")
    flat = {}
    for name in shapes:
        t = state[hf_name(name)]
        flat[name] = t.T.contiguous() if name in transposed else t
    return unflatten_params(flat)


def hf_state_dict(params: Params) -> dict[str, torch.Tensor]:
    """The inverse mapping: params -> a ``GPT2LMHeadModel`` state dict
    (``transformer.*`` names, Conv1D ``[in, out]`` weights, tied ``lm_head``)."""
    state = {}
    for name, t in flatten_params(params).items():
        state["transformer." + hf_name(name)] = t.T.contiguous() if _is_conv1d(name) else t
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def transformers_model(params: Params, config: GPTConfig):
    """transformers' ``GPT2LMHeadModel`` holding ``params`` (the reference,
    for tests and the benchmarks), on the params' device, or None with a line
    saying so when transformers is not installed."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("transformers is not installed: skipping the baseline (pip install transformers)")
        return None
    model = GPT2LMHeadModel(GPT2Config(**config.to_hf())).to(params_device(params))
    model.load_state_dict(hf_state_dict(params), strict=False)
    model.tie_weights()
    return model


def _check_names_and_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GPT2FnError(f"the checkpoint lacks {len(missing)} weights the config needs, e.g. {missing[:3]}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise GPT2FnError(f"the checkpoint has {len(unexpected)} weights the config does not, e.g. {unexpected[:3]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise GPT2FnError(
                f"weight {name} has shape {tuple(state[name].shape)} but the config needs {shape}; "
                "the config and the weights do not belong together"
            )


def load_hf_checkpoint(directory: Path, weights: Optional[Iterable[Path]] = None) -> tuple[Params, GPTConfig]:
    config = read_hf_config(directory)
    state: dict[str, torch.Tensor] = {}
    for file in weights or _hf_weight_files(directory):
        tensors, _ = _read_safetensors(file, keep=lambda name: not _hf_is_buffer(name))
        state.update(tensors)
    return params_from_hf(state, config), config


# ----------------------------------------------------------------------------- the project's own format


def check_float_weights(params: Params, holder: str, verb: str) -> None:
    """One line if ``params`` hold int8-quantized weights, which ``holder``
    (a file format) cannot hold: ``verb`` the float weights, quantize at load."""
    if not all(t.is_floating_point() for t in flatten_params(params).values()):
        raise GPT2FnError(f"these params hold int8-quantized weights, which {holder} cannot hold; {verb} the float "
                          "weights, and load them with dtype='int8' (--dtype int8) to quantize")  # fmt: skip


def save_hf_checkpoint(
    params: Params, config: GPTConfig, directory: str | os.PathLike, tokenizer_from: Optional[str | os.PathLike] = None
) -> Path:  # fmt: skip
    """Write the model as a Hugging Face checkpoint directory, what
    ``GPT2LMHeadModel.save_pretrained`` and a GPT-2 tokenizer's
    ``save_pretrained`` write: ``config.json``, ``model.safetensors`` (Conv1D
    ``[in, out]`` weights, the head tied to ``wte`` and so not stored) and the
    tokenizer as ``vocab.json`` + ``merges.txt``, from ``tokenizer_from`` (a
    model directory, as :func:`~gpt2fn.tokenizer.get_tokenizer` reads one)
    or GPT-2's. transformers' ``from_pretrained``, the Hub and every
    ``--model`` load it. Each file is written atomically, ``config.json``
    last, so an interrupted export is no checkpoint. Float weights only (as
    :func:`save_params`)."""
    from gpt2fn.tokenizer import vocab_and_merges

    check_float_weights(params, "a checkpoint", "export")
    state = {name: t.detach().contiguous().cpu() for name, t in hf_state_dict(params).items() if name != "lm_head.weight"}
    directory = Path(directory)
    vocab, merges = vocab_and_merges(tokenizer_from)
    for name, data in (("vocab.json", vocab), ("merges.txt", merges)):
        atomic_write(directory / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    words = json.loads(vocab)
    eot = words.get("<|endoftext|>", len(words))  # GPT-2's vocab.json holds it (50256); else it follows the words
    write_json(directory / "config.json",
               {**config.to_hf(), "architectures": ["GPT2LMHeadModel"], "bos_token_id": eot, "eos_token_id": eot})
    return directory


def save_params(params: Params, config: GPTConfig, path: str | os.PathLike) -> Path:
    """Write params + config to one safetensors file, atomically: a temporary
    file in the same directory renamed over the target, so a crash never
    leaves a half-written file under the real name. Float weights only: an
    int8-quantized model is saved as its float weights and quantized at load
    (``load_pretrained(..., dtype="int8")``)."""
    check_float_weights(params, "a saved model", "save")
    flat = {name: t.detach().contiguous().cpu() for name, t in flatten_params(params).items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: config.to_json()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_params(path: str | os.PathLike) -> tuple[Params, GPTConfig]:
    """Read a file written by :func:`save_params`."""
    path = Path(path)
    flat, metadata = _read_safetensors(path)
    if CONFIG_METADATA_KEY not in metadata:
        raise GPT2FnError(f"{path} has no gpt2fn config in its metadata; it was not written by save_params")
    try:
        config = GPTConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    except (json.JSONDecodeError, TypeError) as e:
        raise GPT2FnError(f"{path} has a corrupt config in its metadata ({_one_line(e)})") from None
    _check_names_and_shapes(flat, param_shapes(config))
    return unflatten_params(flat), config


# ----------------------------------------------------------------------------- nanoGPT's checkpoints


def params_from_nanogpt(checkpoint: dict) -> tuple[Params, GPTConfig]:
    """The model in nanoGPT's ``ckpt.pt`` (karpathy/nanoGPT's train.py:
    ``model_args`` and ``model``, a state dict of ``nn.Linear`` ``[out, in]``
    weights under Hugging Face's names, each after ``_orig_mod.`` when the
    model was compiled) or in build-nanogpt's ``model_NNNNN.pt`` (the same
    ``model``, and its ``config``). nanoGPT's MLP takes the exact GELU
    (``nn.GELU()``), so the config's ``gelu`` is ``"none"``, and a model it
    trained without biases (``bias=False``) gets zero ones, the same
    function; build-nanogpt's takes GPT-2's tanh GELU, with biases."""
    nanogpt = other_project(checkpoint) == "nanoGPT"
    args = checkpoint["model_args"] if nanogpt else {**vars(checkpoint["config"]), "bias": True}
    try:
        config = GPTConfig(vocab_size=args["vocab_size"], n_ctx=args["block_size"], n_embd=args["n_embd"],
                           n_layer=args["n_layer"], n_head=args["n_head"], gelu="none" if nanogpt else "tanh")  # fmt: skip
    except (KeyError, TypeError):
        raise GPT2FnError(f"the checkpoint's model arguments {args!r} lack the model's shape (vocab_size, block_size, "
                          "n_embd, n_layer, n_head)") from None  # fmt: skip
    state = {k.removeprefix("_orig_mod.").removeprefix("transformer."): v for k, v in checkpoint["model"].items()}
    if args.get("bias") is False:  # nanoGPT's LayerNorm and Linear without bias: zero ones compute the same
        state.update({hf_name(n): torch.zeros(s) for n, s in param_shapes(config).items() if n.endswith(".b")})
    return params_from_hf(state, config, conv1d=False), config


# ----------------------------------------------------------------------------- llm.c's model files

# karpathy/llm.c's model file (train_gpt2.py's write_model, train_gpt2.cu's checkpoints): a header of 256
# little-endian int32 (magic, version, n_ctx, vocab, n_layer, n_head, n_embd, padded vocab, then zeros), then
# every tensor, [out, in] as here, the blocks' stacked over layers, in one dtype: version 3 fp32, 5 bf16.
LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: torch.float32, 5: torch.bfloat16}
LLMC_HEADER_BYTES = 256 * 4
LLMC_VOCAB_MULTIPLE = 128  # llm.c pads wte's rows with zeros to a multiple of 128 (50257 -> 50304)
LLMC_BLOCK_ORDER = ("ln_1.g", "ln_1.b", "attn.c_attn.w", "attn.c_attn.b", "attn.c_proj.w", "attn.c_proj.b",
                    "ln_2.g", "ln_2.b", "mlp.c_fc.w", "mlp.c_fc.b", "mlp.c_proj.w", "mlp.c_proj.b")  # fmt: skip


def _llmc_names(n_layer: int) -> list[str]:
    """Our names in the file's order: each block tensor for every layer before the next tensor."""
    return ["wte", "wpe", *(f"blocks.{i}.{leaf}" for leaf in LLMC_BLOCK_ORDER for i in range(n_layer)), "ln_f.g", "ln_f.b"]


def load_llmc(path: str | os.PathLike) -> tuple[Params, GPTConfig]:
    """Read a model file of llm.c: ``gpt2_124M.bin`` and ``gpt2_124M_bf16.bin``
    as its ``train_gpt2.py`` writes them, or a ``model_NNNNNNNN.bin`` that
    ``train_gpt2.cu`` saved while training. llm.c computes GPT-2's function
    (tanh GELU, LayerNorm eps 1e-5, the head tied to ``wte``), so this is
    the model llm.c runs; the zero rows that pad its vocabulary are dropped
    (llm.c reads only the first ``vocab`` logits). bf16 files give bf16
    params. The file is memory-mapped and checked against its header's size."""
    path = Path(path)
    if not path.is_file():
        raise GPT2FnError(f"llm.c model file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(LLMC_HEADER_BYTES)
    if len(head) < LLMC_HEADER_BYTES or struct.unpack_from("<i", head)[0] != LLMC_MAGIC:
        raise GPT2FnError(f"{path} is not an llm.c model file (it does not start with llm.c's magic number "
                          f"{LLMC_MAGIC}); gpt2fn reads .bin files of llm.c only, never a pickle such as "
                          "pytorch_model.bin: convert that to model.safetensors")  # fmt: skip
    _, version, n_ctx, vocab, n_layer, n_head, n_embd, padded = struct.unpack_from("<8i", head)
    if version not in LLMC_VERSIONS:
        raise GPT2FnError(f"{path} is an llm.c model file of version {version}; gpt2fn reads versions 3 (fp32) and "
                          "5 (bf16), which llm.c writes today: write it again with llm.c's train_gpt2.py")  # fmt: skip
    config = GPTConfig(vocab_size=vocab, n_ctx=n_ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    if padded < vocab:
        raise GPT2FnError(f"{path}'s header pads the vocabulary of {vocab} to {padded} rows, fewer; the file is corrupt")
    dtype = LLMC_VERSIONS[version]
    shapes = {**param_shapes(config), "wte": (padded, n_embd)}
    names = _llmc_names(n_layer)
    size = LLMC_HEADER_BYTES + dtype.itemsize * sum(math.prod(shapes[name]) for name in names)
    if path.stat().st_size != size:
        raise GPT2FnError(f"{path} holds {path.stat().st_size} bytes, but the model its header describes "
                          f"({n_layer} layers of {n_embd}, {n_ctx} positions, {padded} rows of vocabulary, "
                          f"{dtype}) takes {size}: it is truncated or corrupt; copy or write it again")  # fmt: skip
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    flat, offset = {}, LLMC_HEADER_BYTES
    for name in names:
        end = offset + dtype.itemsize * math.prod(shapes[name])
        flat[name] = data[offset:end].view(dtype).view(shapes[name])
        offset = end
    flat["wte"] = flat["wte"][:vocab]
    return unflatten_params({name: flat[name].clone() for name in param_shapes(config)}), config


def save_llmc(params: Params, config: GPTConfig, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write the model as llm.c's model file, byte for byte what llm.c's
    ``train_gpt2.py`` writes for it: version 3 in fp32 or 5 in bf16, the
    vocabulary padded with zero rows to a multiple of 128. llm.c's
    ``train_gpt2.cu`` starts from it (``-e FILE``: the fp32 file for an FP32
    build, bf16 for the default), and :func:`load_llmc` reads it back.
    Written atomically; float weights only, and GPT-2's LayerNorm eps
    (llm.c's is fixed)."""
    check_float_weights(params, "an llm.c model file", "save")
    version = {v: k for k, v in LLMC_VERSIONS.items()}.get(dtype)
    if version is None:
        raise GPT2FnError(f"llm.c model files hold float32 or bfloat16 weights, not {str(dtype).removeprefix('torch.')}")
    if config.layer_norm_eps != 1e-5 or config.gelu != "tanh":
        gelu = "tanh's" if config.gelu == "tanh" else "the exact one"
        raise GPT2FnError(f"this model's LayerNorm eps is {config.layer_norm_eps} and its GELU {gelu}; llm.c computes "
                          "with eps 1e-5 and tanh's GELU only, so it would run another function: save it as "
                          ".safetensors instead")  # fmt: skip
    V, D = config.vocab_size, config.n_embd
    padded = -(-V // LLMC_VOCAB_MULTIPLE) * LLMC_VOCAB_MULTIPLE
    header = [LLMC_MAGIC, version, config.n_ctx, V, config.n_layer, config.n_head, D, padded]
    flat = flatten_params(params)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<256i", *header, *[0] * (256 - len(header))))
            for name in _llmc_names(config.n_layer):
                t = flat[name].detach().to("cpu", dtype).contiguous()
                if name == "wte":
                    t = torch.cat([t, t.new_zeros(padded - V, D)])
                f.write(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))  # its bytes, without numpy

    return atomic_write(path, write)


# ----------------------------------------------------------------------------- one entry point


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: Optional[str] = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Params, GPTConfig]:
    """Load a model from anything :func:`resolve_model` understands.
    Returns ``(params, config)`` with params cast to ``dtype`` on ``device``
    (:func:`~gpt2fn.device.resolve_device`: "cpu", "cuda", "cuda:N" or
    "auto"): a floating dtype (``torch.bfloat16`` or its name, "bfloat16"),
    or int8, the weight-only quantization of :mod:`gpt2fn.quantize`."""
    device = resolve_device(device)
    path = resolve_model(name_or_path, revision)
    if path.is_dir():
        params, config = load_hf_checkpoint(path)
    elif path.suffix == ".safetensors":
        _, metadata = _read_safetensors(path, keep=lambda name: False)
        if CONFIG_METADATA_KEY in metadata:
            params, config = load_params(path)
        else:  # a Hugging Face weights file: its config.json must sit beside it
            params, config = load_hf_checkpoint(path.parent, weights=[path])
    elif path.suffix == ".pt":  # a checkpoint written by training, read without running code
        if not SAFE_TORCH_LOAD:
            raise GPT2FnError(f"{path}: torch {torch.__version__}'s weights-only loader has known holes that let a .pt "
                              "file run code (fixed in torch 2.10); upgrade torch, or export the run's weights with "
                              "scripts/train.py ... --resume --export w.safetensors")  # fmt: skip
        state = read_pt(path)
        if other_project(state):
            params, config = params_from_nanogpt(state)
        else:
            state = checkpoint_state(state, path)
            config = state["config"]
            _check_names_and_shapes(state["params"], param_shapes(config))
            params = unflatten_params(state["params"])
    elif path.suffix == ".bin":
        params, config = load_llmc(path)
    else:
        raise GPT2FnError(f"{path} is not a directory, a .safetensors file, a training checkpoint (.pt) or an llm.c "
                          "model file (.bin)")
    name = str(dtype).removeprefix("torch.")
    if name == "int8":
        params = quantize_int8(params)
    elif isinstance(getattr(torch, name, None), torch.dtype) and getattr(torch, name).is_floating_point:
        params = map_params(lambda t: t.to(getattr(torch, name)), params)
    else:
        raise GPT2FnError(f"weights cannot be {name}; use a floating dtype (float32, bfloat16, float16) or int8")
    return map_params(lambda t: t.to(device), params), config

