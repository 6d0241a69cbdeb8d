"""Hugging Face GPT-2 folders in and out: what transformers' `save_pretrained` writes, read into minilm's
config, parameter tree and tokenizer, and written back so `GPT2LMHeadModel.from_pretrained` and
`AutoTokenizer.from_pretrained` load it with the same logits and the same token ids.

    HF folder                                  minilm
    config.json (GPT2Config)                   ModelConfig (what minilm cannot express is refused)
    model.safetensors, or shards listed in     params: a plain tree of float32 arrays
      model.safetensors.index.json
    tokenizer.json, or vocab.json + merges.txt BpeTokenizer (minilm/tokenizer.py)
                                               (minilm's char and word vocabularies export as a
                                               WordLevel tokenizer.json with the same ids)

The weights map one to one except for attention. GPT-2 stores each linear layer as a `Conv1D` whose
weight is (d_in, d_out), minilm's own layout (x @ W), so nothing is transposed; its query, key and value
projections are one fused `c_attn` of shape (D, 3D), whose columns are q | k | v side by side:

    transformer.h.{i}.attn.c_attn.weight (D, 3D)  ->  blocks.{i}.attn.q.w, .k.w, .v.w   (D, D) each
    transformer.h.{i}.attn.c_proj         ->  blocks.{i}.attn.o      transformer.h.{i}.ln_1   ->  ln1
    transformer.h.{i}.mlp.c_fc            ->  blocks.{i}.mlp.fc      transformer.h.{i}.ln_2   ->  ln2
    transformer.h.{i}.mlp.c_proj          ->  blocks.{i}.mlp.proj    transformer.ln_f         ->  ln_f
    transformer.wte (V, D), wpe (T, D)    ->  embed.tok, embed.pos   LayerNorm weight         ->  scale

The output head is tied to wte (no lm_head.weight is stored; one that is must equal wte). Names come with
the `transformer.` prefix (GPT2LMHeadModel) or without (GPT2Model); the causal-mask buffers `attn.bias`
and `attn.masked_bias` that older transformers saved are not weights and are skipped. Only safetensors
is read: a `pytorch_model.bin` is a pickle, which can run code when loaded, and is refused.

No network, ever: getting a model's folder is the user's step (`huggingface-cli download gpt2
--local-dir gpt2`, or `save_pretrained`). Dropout settings are not kept: minilm trains without dropout.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from minilm.config import ModelConfig
from minilm.errors import MinilmError
from minilm.tokenizer import END_OF_TEXT, BpeTokenizer, Tokenizer

# transformers' names for the GELU forms minilm has (ModelConfig.gelu). gelu_new, gelu_pytorch_tanh and
# gelu_fast are the same tanh formula, spelled differently; gelu is the exact erf form.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "erf"}
EXPORTED_ACTIVATION = {"tanh": "gelu_new", "erf": "gelu"}
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
PREFIX = "transformer."
BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights

# GPT2Config keys that change the maths, and the one value minilm computes (anything else is refused)
_MUST_BE = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "add_cross_attention": False,
            "is_encoder_decoder": False}


def _refuse(key: str, value, why: str) -> MinilmError:
    return MinilmError(f"config.json: {key} = {json.dumps(value)} {why}; minilm reads GPT-2 models as "
                       f"transformers' GPT2LMHeadModel defines them")


def config_from_hf(hf: dict) -> ModelConfig:
    """A GPT2Config's dict (config.json) -> ModelConfig; what minilm cannot represent raises, naming the key."""
    if not isinstance(hf, dict):
        raise MinilmError("config.json must hold a JSON object (a GPT2Config)")
    if hf.get("model_type") != "gpt2":
        raise _refuse("model_type", hf.get("model_type"), "is not 'gpt2'; only GPT-2 models can be imported")
    architectures = hf.get("architectures") or ["GPT2LMHeadModel"]
    if any(a not in ARCHITECTURES for a in architectures):
        raise _refuse("architectures", architectures, f"names a model other than {' or '.join(ARCHITECTURES)}")
    for key, value in _MUST_BE.items():
        if hf.get(key, value) != value:
            raise _refuse(key, hf[key], f"is not supported (minilm computes only {json.dumps(value)})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise _refuse("activation_function", activation, f"is not one of {', '.join(ACTIVATIONS)}")
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        value = hf.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _refuse(key, value, "must be a positive whole number")
    if hf.get("n_ctx", hf["n_positions"]) != hf["n_positions"]:
        raise _refuse("n_ctx", hf["n_ctx"], f"differs from n_positions = {hf['n_positions']}")
    try:
        n_inner = hf.get("n_inner") or 4 * hf["n_embd"]  # None means GPT-2's 4 D: minilm's default mlp_ratio
        return ModelConfig(vocab_size=hf["vocab_size"], context=hf["n_positions"], width=hf["n_embd"],
                           layers=hf["n_layer"], heads=hf["n_head"],
                           mlp_units=None if n_inner == 4 * hf["n_embd"] else n_inner,
                           gelu=ACTIVATIONS[activation], ln_eps=hf.get("layer_norm_epsilon", 1e-5))
    except MinilmError as e:
        raise MinilmError(f"config.json does not make a valid model: {e}") from None


def config_to_hf(cfg: ModelConfig, tokenizer: Tokenizer | None = None) -> dict:
    """ModelConfig -> the GPT2Config dict transformers reads (config.json)."""
    if not cfg.mlp:
        raise MinilmError("an attention-only model (mlp = false) has no GPT-2 counterpart: GPT-2 blocks always "
                          "have an MLP; only models with MLPs can be exported")
    eos = tokenizer.index.get(END_OF_TEXT) if tokenizer is not None else None
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context, "n_embd": cfg.width, "n_layer": cfg.layers, "n_head": cfg.heads,
            "n_inner": cfg.mlp_width, "activation_function": EXPORTED_ACTIVATION[cfg.gelu],
            "layer_norm_epsilon": cfg.ln_eps, "tie_word_embeddings": True, "bos_token_id": eos,
            "eos_token_id": eos, "torch_dtype": "float32"}


# ---------------------------------------------------------------- weights


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise MinilmError(f"{path} is missing: {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinilmError(f"{path} is not valid JSON ({e})") from None


def _safetensors_files(folder: Path) -> list[Path]:
    """The folder's weight files: model.safetensors, or every shard its index lists."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MinilmError(f"{index} has no weight_map; it must map each tensor name to its shard file")
        shards = []
        for name in dict.fromkeys(weight_map.values()):
            shard = folder / str(name)
            if Path(str(name)).name != name or not shard.is_file():
                raise MinilmError(f"{index} lists shard {name!r}, which is not a file in {folder}; the folder "
                                  f"is incomplete: download or save it again")
            shards.append(shard)
        return shards
    if (folder / "pytorch_model.bin").is_file():
        raise MinilmError(f"{folder} holds only pytorch_model.bin, a pickle file, which can run code when loaded; "
                          f"minilm reads safetensors only. Convert it once where you trust the file: "
                          f"GPT2LMHeadModel.from_pretrained('{folder}').save_pretrained('{folder}-st') "
                          f"(transformers writes model.safetensors by default)")
    raise MinilmError(f"{folder} has no model.safetensors (nor model.safetensors.index.json); give a folder "
                      f"written by transformers' save_pretrained")


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file(s), named without the `transformer.` prefix, as float32;
    the attention-mask buffers left out."""
    tensors = {}
    for path in _safetensors_files(folder):
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    tensors[name.removeprefix(PREFIX)] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise MinilmError(f"{path} is not a readable safetensors file of float tensors ({e})") from None
    out = {}
    for name, x in tensors.items():
        if BUFFERS.match(name):
            continue
        if not np.issubdtype(x.dtype, np.floating):
            raise MinilmError(f"tensor {name} has dtype {x.dtype}; expected floating-point weights")
        out[name] = x.astype(np.float32)
    return out


def to_minilm(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor names (no prefix) -> minilm's dotted names; c_attn split into q | k | v."""
    D = cfg.width
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, tensors.get("wte.weight")):
        raise MinilmError("lm_head.weight differs from wte.weight: the output head is not tied to the token "
                          "embedding, which minilm's model always ties (tie_word_embeddings)")
    out = {}
    for name, x in tensors.items():
        parts = name.split(".")
        if name in ("wte.weight", "wpe.weight"):
            out[{"wte": "embed.tok", "wpe": "embed.pos"}[parts[0]]] = x
        elif parts[0] == "ln_f":
            out[f"ln_f.{_LN[parts[1]]}"] = x
        elif parts[0] == "h" and len(parts) >= 4:
            block = f"blocks.{parts[1]}"
            layer = ".".join(parts[2:-1])
            kind = parts[-1]
            if layer in ("ln_1", "ln_2"):
                out[f"{block}.ln{layer[-1]}.{_LN[kind]}"] = x
            elif layer == "attn.c_attn":  # (D, 3D) -> three (D, D), or (3D,) -> three (D,)
                for i, part in enumerate("qkv"):  # a copy: safetensors writes a strided view's buffer as it lies
                    out[f"{block}.attn.{part}.{_LINEAR[kind]}"] = np.ascontiguousarray(x[..., i * D:(i + 1) * D])
            elif layer in _LAYERS:
                out[f"{block}.{_LAYERS[layer]}.{_LINEAR[kind]}"] = x
            else:
                out[name] = x  # unknown: named in fill's "unexpected" list
        else:
            out[name] = x
    return out


_LN = {"weight": "scale", "bias": "bias"}
_LINEAR = {"weight": "w", "bias": "b"}
_LAYERS = {"attn.c_proj": "attn.o", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}


def from_minilm(params: dict) -> dict[str, np.ndarray]:
    """minilm's parameter tree -> transformers' GPT2LMHeadModel tensor names (with the prefix), q | k | v fused."""
    from minilm.tree import named_leaves

    named = {k: np.asarray(v, dtype=np.float32) for k, v in named_leaves(params).items()}
    out = {"wte.weight": named.pop("embed.tok"), "wpe.weight": named.pop("embed.pos")}
    ln = {v: k for k, v in _LN.items()}
    linear = {v: k for k, v in _LINEAR.items()}
    layers = {v: k for k, v in _LAYERS.items()}
    for name in list(named):
        parts = name.split(".")
        if parts[0] == "ln_f":
            out[f"ln_f.{ln[parts[1]]}"] = named.pop(name)
        elif parts[2] in ("ln1", "ln2"):
            out[f"h.{parts[1]}.ln_{parts[2][-1]}.{ln[parts[3]]}"] = named.pop(name)
        elif parts[2:4] == ["attn", "q"]:
            kind = parts[4]
            fused = [named.pop(f"blocks.{parts[1]}.attn.{p}.{kind}") for p in "qkv"]
            out[f"h.{parts[1]}.attn.c_attn.{linear[kind]}"] = np.concatenate(fused, axis=-1)  # (D, 3D) or (3D,)
    for name, x in named.items():  # what is left: attn.o, mlp.fc, mlp.proj
        parts = name.split(".")
        out[f"h.{parts[1]}.{layers['.'.join(parts[2:4])]}.{linear[parts[4]]}"] = x
    return {PREFIX + k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------- tokenizer


def read_tokenizer(folder: Path) -> BpeTokenizer:
    """tokenizer.json if the folder has one, else vocab.json + merges.txt (as GPT2Tokenizer reads them)."""
    spec = folder / "tokenizer.json"
    if spec.is_file():
        try:
            return BpeTokenizer.from_spec(spec.read_text(encoding="utf-8"))
        except MinilmError as e:
            raise MinilmError(f"{spec}: {e}") from None
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.is_file() and merges.is_file():
        settings = folder / "tokenizer_config.json"
        prefix = bool(_read_json(settings, "").get("add_prefix_space", False)) if settings.is_file() else False
        return BpeTokenizer.from_files(vocab, merges, add_prefix_space=prefix)
    raise MinilmError(f"{folder} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt "
                      f"(transformers' tokenizer.save_pretrained writes them)")


def plain_backend(tokenizer: Tokenizer):
    """minilm's char or word vocabulary as a tokenizers-library WordLevel tokenizer with the same ids: characters
    one by one (newlines too), or words split on spaces and tabs with each newline a token of its own."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.WordLevel(dict(tokenizer.index), unk_token=tokenizer.vocab[0]))
    if tokenizer.kind == "char":
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), "isolated")  # (?m): "." matches a newline
        backend.decoder = decoders.Fuse()  # characters join with nothing between them
    else:  # the pieces are the matches: runs of non-space characters, and each newline alone
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^ \t\n]+|\n"), "removed", invert=True)
    return backend


def write_tokenizer(folder: Path, tokenizer: Tokenizer, context: int) -> None:
    """tokenizer.json (+ vocab.json and merges.txt for a BPE) and tokenizer_config.json, as AutoTokenizer reads them.

    minilm's own char and word vocabularies are written as a WordLevel tokenizer.json (plain_backend) that
    gives the same ids; transformers' decode joins a word vocabulary's tokens with spaces, newlines too."""
    if not isinstance(tokenizer, BpeTokenizer):
        backend = plain_backend(tokenizer)
        backend.save(str(folder / "tokenizer.json"))
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context}
        (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
        return
    backend = tokenizer._backend
    backend.save(str(folder / "tokenizer.json"))
    backend.model.save(str(folder))  # vocab.json, merges.txt: what the slow GPT2Tokenizer reads
    # vocab.json lists every id, <|endoftext|> too, as GPT-2's own does (the library leaves added tokens out)
    (folder / "vocab.json").write_text(json.dumps(dict(zip(tokenizer.vocab, range(tokenizer.size))),
                                                  ensure_ascii=False), encoding="utf-8")
    special = {f"{k}_token": END_OF_TEXT for k in ("bos", "eos", "unk")} if END_OF_TEXT in tokenizer.index else {}
    pre = json.loads(tokenizer.spec).get("pre_tokenizer") or {}
    settings = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": context,
                "add_prefix_space": bool(pre.get("add_prefix_space", False)), **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1), encoding="utf-8")


# ---------------------------------------------------------------- folders


def is_folder(folder) -> bool:
    """Is `folder` a Hugging Face model folder (a config.json with a model_type), not a minilm checkpoint?"""
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data


def load(folder) -> tuple[ModelConfig, dict, BpeTokenizer]:
    """Read a Hugging Face GPT-2 folder -> (ModelConfig, params as a tree of float32 numpy arrays, tokenizer).

    Raises a MinilmError naming what is missing, unsupported (a config key and its value), mis-shaped or
    not finite."""
    from minilm.checkpoint import check_finite
    from minilm.model import param_shapes
    from minilm.tree import fill

    folder = Path(folder)
    if not folder.is_dir():
        raise MinilmError(f"{folder} is not a folder; give the folder transformers' save_pretrained (or "
                          f"huggingface-cli download) wrote")
    cfg = config_from_hf(_read_json(folder / "config.json", "a Hugging Face model folder has a config.json"))
    tokenizer = read_tokenizer(folder)
    if tokenizer.size != cfg.vocab_size:
        raise MinilmError(f"{folder}: the tokenizer has {tokenizer.size} tokens but config.json says vocab_size = "
                          f"{cfg.vocab_size}; minilm needs one embedding row per token")
    named = to_minilm(read_tensors(folder), cfg)
    check_finite(named, f"{folder}")
    params = fill(param_shapes(cfg), named, f"{folder} (weights)")
    return cfg, params, tokenizer


def save(folder, params: dict, cfg: ModelConfig, tokenizer: Tokenizer, *, mark_kind: str | None = "hf") -> None:
    """Write a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer files), atomically: built as
    FOLDER.tmp, then renamed into place. `mark_kind`: minilm's folder mark (folders.py), so --overwrite may
    replace it later; None leaves the folder unmarked."""
    from minilm import folders
    from minilm.checkpoint import check_finite, staging_dir, swap_in

    folder = Path(folder)
    tensors = from_minilm(params)
    check_finite(tensors, f"not exporting to {folder}")
    hf_config = config_to_hf(cfg, tokenizer)
    tmp = staging_dir(folder)
    try:
        write_tokenizer(tmp, tokenizer, cfg.context)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=1), encoding="utf-8")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})  # transformers requires "pt"
        if mark_kind:
            folders.mark(tmp, mark_kind)
    except (OSError, SafetensorError, MinilmError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        folders.release(tmp)
        raise MinilmError(f"could not write {folder} ({getattr(e, 'strerror', None) or e}); nothing was "
                          f"written there") from None
    swap_in(tmp, folder)
