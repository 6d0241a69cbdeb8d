"""PEFT LoRA adapter folders for GPT-2, read into minilm adapters and written back.

    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "use_rslora", "target_modules",
                                "rank_pattern", "alpha_pattern", "fan_in_fan_out": true, ...}
    adapter_model.safetensors  base_model.model.transformer.h.{i}.{module}.lora_A.weight  (R, d_in)
                               base_model.model.transformer.h.{i}.{module}.lora_B.weight  (d_out, R)

PEFT computes y = x W + s · x lora_Aᵀ lora_Bᵀ (s = alpha / R, or alpha / sqrt(R) with use_rslora), so
minilm's A (d_in, R) is lora_Aᵀ and B (R, d_out) is lora_Bᵀ. The modules map as minilm/hf.py maps the
weights, with one difference: GPT-2's q, k and v are one fused c_attn (D, 3D), so

    h.{i}.attn.c_attn   <->  blocks.{i}.attn.q, k, v with one shared A (fuse_qkv); B = lora_Bᵀ split in 3 column blocks
    h.{i}.attn.c_proj   <->  blocks.{i}.attn.o      h.{i}.mlp.c_fc <-> mlp.fc      h.{i}.mlp.c_proj <-> mlp.proj

Going out, separate q / k / v adapters (not fused) become one c_attn adapter of rank ΣR: lora_A stacks
their Aᵀ, lora_B is block-structured (each part's Bᵀ in its rows and its own columns, zeros elsewhere),
and its rank and alpha are written to rank_pattern / alpha_pattern so the scale is theirs.

A PEFT folder carries no minilm digest or base fingerprint: it is checked by structure (tensor names,
shapes against the base, finite values, ranks against the config) and accepted. What does not map is
refused, naming the key: DoRA, adapters on the tied embedding or lm_head, trained biases,
modules_to_save, initialisations that change the base weights (PiSSA, OLoRA, ...), other PEFT types.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lora.attach import attach
from lora.config import LoraConfig
from lora.stack import fill_shared_a, levels, lora_weights
from lora.targets import pattern_value
from lora.train import split
from minilm.checkpoint import check_finite, staging_dir, swap_in
from minilm.errors import MinilmError
from minilm.tree import combine, fill

CONFIG, ARRAYS = "adapter_config.json", "adapter_model.safetensors"
# PEFT's module (under transformer.h.{i}) -> minilm's matrices in block i
MODULES = {"attn.c_attn": ("attn.q", "attn.k", "attn.v"), "attn.c_proj": ("attn.o",),
           "mlp.c_fc": ("mlp.fc",), "mlp.c_proj": ("mlp.proj",)}
TENSOR = re.compile(r"^base_model\.model\.(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                    r"\.(lora_A|lora_B)\.weight$")
# adapter_config.json keys whose other values change the maths in ways minilm does not compute
_REFUSED = {"use_dora": "DoRA (a magnitude vector per output unit) is not read from PEFT folders; train plain LoRA",
            "modules_to_save": "fully trained modules are not adapters; merge the model and use import-hf instead",
            "lora_bias": "a bias on lora_B is not part of minilm's LoRA",
            "layer_replication": "replicated layers change the base model",
            "target_parameters": "LoRA on raw parameters is not minilm's LoRA",
            "trainable_token_indices": "trained token rows change the tied embedding",
            "use_qalora": "QA-LoRA pools the input; minilm's LoRA does not",
            "alora_invocation_tokens": "activated LoRA depends on the tokens; minilm's does not"}


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT folder as read: its config and, per PEFT module (`h.0.attn.c_attn`), lora_A, lora_B and alpha."""

    config: dict
    modules: dict  # {"h.{i}.{module}": (lora_A (R, d_in), lora_B (d_out, R), alpha)}


def not_fingerprinted(folder, base) -> str:
    """What a user is told when a PEFT folder is read: it was checked by structure, not by fingerprint."""
    return (f"{folder} is a PEFT folder: it carries no fingerprint of its base, so it was checked by structure "
            f"only (names, shapes against {base}, finite values)")


def is_peft_folder(folder) -> bool:
    """Does `folder` hold a PEFT adapter (adapter_config.json with a peft_type), not a minilm one?"""
    try:
        data = json.loads((Path(folder) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "peft_type" in data


def _pattern_key(keys, module: str):
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that, as a regular expression, matches
    the module's name or its end after a dot (peft.utils.other.get_pattern_key)."""
    return next((k for k in keys if re.match(rf"(.*\.)?({k})$", module)), None)


def read_peft(folder) -> PeftAdapter:
    """Read and check a PEFT LoRA folder for GPT-2; what minilm cannot compute raises, naming the key."""
    folder = Path(folder)
    config_path, arrays_path = folder / CONFIG, folder / ARRAYS
    for f in (config_path, arrays_path):
        if not f.is_file():
            more = " (adapter_model.bin is a pickle: save it with save_pretrained, which writes safetensors)" \
                if f == arrays_path and (folder / "adapter_model.bin").is_file() else ""
            raise MinilmError(f"{f} is missing; give a folder written by PEFT's save_pretrained{more}")
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MinilmError(f"{config_path} is not valid JSON ({e})") from None

    def refuse(key, why):
        return MinilmError(f"{config_path}: {key} = {json.dumps(cfg.get(key))}: {why}")

    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise refuse("peft_type", "only LoRA adapters (peft_type LORA) can be read")
    for key, why in _REFUSED.items():
        if cfg.get(key):
            raise refuse(key, why)
    if cfg.get("bias", "none") != "none":
        raise refuse("bias", "trained biases change the base model; train with bias='none'")
    init = cfg.get("init_lora_weights", True)
    if not isinstance(init, bool) and init != "gaussian":
        raise refuse("init_lora_weights", "this initialisation changes the base weights (a residual base); save "
                     "the adapter with save_pretrained(..., path_initial_model_for_weight_conversion=...), which "
                     "turns it into a plain LoRA on the original weights")
    base_class = (cfg.get("auto_mapping") or {}).get("base_model_class", "GPT2LMHeadModel")
    if base_class not in ("GPT2LMHeadModel", "GPT2Model"):
        raise MinilmError(f"{config_path}: auto_mapping.base_model_class = {base_class!r}: only GPT-2 adapters map")
    for key in ("r", "lora_alpha"):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise refuse(key, "must be a positive number")
    try:
        tensors = load_file(arrays_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise MinilmError(f"{arrays_path} is not a readable safetensors file ({e})") from None
    check_finite(tensors, str(arrays_path))
    pairs: dict = {}
    for name, x in tensors.items():
        hit = TENSOR.match(name)
        if hit is None:
            if "wte" in name or "lm_head" in name or "lora_embedding" in name:
                why = "an adapter on the tied token embedding (wte / lm_head); target only c_attn, c_proj, c_fc"
            elif "lora_magnitude_vector" in name:
                why = "a DoRA magnitude; train plain LoRA"
            else:
                why = "not a lora_A / lora_B weight of a GPT-2 block's c_attn, c_proj or c_fc"
            raise MinilmError(f"{arrays_path}: tensor {name} is {why}")
        pairs.setdefault(f"h.{hit[1]}.{hit[2]}", {})[hit[3]] = np.asarray(x, np.float32)
    prefixed = any(".transformer.h." in n for n in tensors)
    modules = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise MinilmError(f"{arrays_path}: {module} has {sorted(pair)} but needs both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        key = f"transformer.{module}" if prefixed else module  # the module's name as PEFT matched it
        rank = cfg.get("rank_pattern", {}).get(_pattern_key(cfg.get("rank_pattern") or {}, key), cfg["r"])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise MinilmError(f"{arrays_path}: {module} lora_A {a.shape}, lora_B {b.shape}: expected (R, d_in) and "
                              f"(d_out, R) with R = {rank} (r / rank_pattern in {CONFIG})")
        alphas = cfg.get("alpha_pattern") or {}
        modules[module] = (a, b, float(alphas.get(_pattern_key(alphas, key), cfg["lora_alpha"])))
    if not modules:
        raise MinilmError(f"{arrays_path} holds no LoRA tensors")
    return PeftAdapter(cfg, modules)


def to_minilm(adapter: PeftAdapter, base_params, name: str = "default"):
    """The base with the PEFT adapter attached -> (params, LoraConfig). Shapes are checked against the base."""
    D, n_layers = base_params["embed"]["tok"].shape[1], len(base_params["blocks"])
    ranks, alphas, arrays = {}, {}, {}
    for module, (a, b, alpha) in adapter.modules.items():
        _, i, kind = module.split(".", 2)
        if int(i) >= n_layers:
            raise MinilmError(f"the PEFT adapter has {module}, but the base has blocks 0..{n_layers - 1}: "
                              f"it was trained on another model")
        parts = MODULES[kind]
        group, first = parts[0].split(".")
        if group not in base_params["blocks"][int(i)]:
            raise MinilmError(f"the PEFT adapter has {module}, but the base's blocks have no {group}")
        d_in = base_params["blocks"][int(i)][group][first]["w"].shape[0]
        d_out = sum(base_params["blocks"][int(i)][group][p.split(".")[1]]["w"].shape[1] for p in parts)
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise MinilmError(f"the PEFT adapter's {module} is lora_A {a.shape}, lora_B {b.shape}, but the base's "
                              f"matrix is {d_in}x{d_out}: it was trained on a model of another shape")
        for j, part in enumerate(parts):
            site = f"blocks.{i}.{part}"
            ranks[site], alphas[site] = a.shape[0], alpha
            arrays[f"{site}.w.lora_b"] = np.ascontiguousarray(b[j * D:(j + 1) * D].T if len(parts) == 3 else b.T)
        arrays[f"blocks.{i}.{parts[0]}.w.lora_a"] = np.ascontiguousarray(a.T)  # k, v share q's A (fuse_qkv)
    cfg = _lora_config(adapter.config, ranks, alphas, n_layers, name)
    params = attach(base_params, cfg, key=jax.random.key(0))
    trainable, frozen = split(params, cfg)
    trainable = fill(trainable, arrays, "the PEFT adapter")
    return fill_shared_a(combine(jax.tree.map(jnp.asarray, trainable), frozen)), cfg


def _lora_config(peft: dict, ranks: dict, alphas: dict, n_layers: int, name: str) -> LoraConfig:
    """The LoraConfig of these sites: block-matrix targets (and layers) where every adapted block has the same
    ones, else full names; PEFT's r and lora_alpha, with a pattern entry for each site that differs."""
    by_kind: dict = {}
    for site in ranks:
        _, i, kind = site.split(".", 2)
        by_kind.setdefault(kind, set()).add(int(i))
    layer_sets = {frozenset(v) for v in by_kind.values()}
    if len(layer_sets) == 1:
        layers = sorted(next(iter(layer_sets)))
        targets = tuple(k for k in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj") if k in by_kind)
        layers = None if layers == list(range(n_layers)) else tuple(layers)
    else:
        targets, layers = tuple(sorted(ranks)), None
    rank, alpha = int(peft["r"]), float(peft["lora_alpha"])
    return LoraConfig(rank=rank, alpha=alpha, use_rslora=bool(peft.get("use_rslora", False)),
                      dropout=float(peft.get("lora_dropout") or 0.0), targets=targets, layers=layers,
                      rank_pattern={s: r for s, r in ranks.items() if r != rank},
                      alpha_pattern={s: a for s, a in alphas.items() if a != alpha},
                      init="gaussian" if peft.get("init_lora_weights") == "gaussian" else "standard",
                      fuse_qkv=any(s.endswith("attn.q") for s in ranks), name=name)


# ---------------------------------------------------------------- minilm -> PEFT


def from_minilm(params, cfg: LoraConfig, model_cfg) -> tuple[dict, dict[str, np.ndarray]]:
    """A minilm adapter -> (adapter_config.json as a dict, adapter_model.safetensors' tensors) for PEFT."""
    if cfg.use_dora:
        raise MinilmError("a DoRA adapter cannot be written as plain PEFT LoRA here; merge it (minilm merge) and "
                          "export the model with export-hf")
    if cfg.init == "pissa":
        raise MinilmError("a PiSSA adapter trained on a residual base, not the original weights; merge it "
                          "(minilm merge) and export the model with export-hf")
    if cfg.bias != "none" or cfg.modules_to_save:
        raise MinilmError(f"this adapter also trains bias={cfg.bias!r} / modules_to_save={list(cfg.modules_to_save)},"
                          f" which a PEFT LoRA folder for GPT-2 does not hold here; merge it and use export-hf")
    weights = lora_weights(params)
    if "embed.tok" in weights:
        raise MinilmError("an adapter on the tied embedding adapts the output head too, which PEFT's embedding "
                          "adapter does not; merge it (minilm merge) and export the model with export-hf")
    if any(len(list(levels(w))) > 1 for w in weights.values()):
        raise MinilmError("several adapters are stacked on one matrix; export them one at a time")
    D, modules = model_cfg.width, {}  # {"h.{i}.{module}": (lora_A, lora_B, rank, alpha)}
    for i in range(model_cfg.layers):
        for kind, parts in MODULES.items():
            here = [(p, weights[f"blocks.{i}.{p}.w"]) for p in parts if f"blocks.{i}.{p}.w" in weights]
            if not here:
                continue
            scale = here[0][1].scale  # the combined adapter keeps the first part's scale; others are folded into B
            shared = len(here) > 1 and all(w.a_from for _, w in here[1:])
            a_blocks = [np.asarray(here[0][1].lora_a).T] if shared else [np.asarray(w.lora_a).T for _, w in here]
            rank = sum(x.shape[0] for x in a_blocks)
            b = np.zeros((D * len(parts) if len(parts) == 3 else here[0][1].shape[1], rank), np.float32)
            col = 0
            for p, w in here:
                rows = parts.index(p) * D
                block = np.asarray(w.lora_b).T * np.float32(w.scale / scale) if w.scale != scale \
                    else np.asarray(w.lora_b).T  # (d_out, R)
                b[rows:rows + block.shape[0], col:col + w.rank] = block
                col += 0 if shared else w.rank
            alpha = scale * (math.sqrt(rank) if cfg.use_rslora else rank)
            if rank == here[0][1].rank:  # the part's own alpha, exactly (no rounding through the scale)
                alpha = float(_alpha(cfg, f"blocks.{i}.{here[0][0]}"))
            modules[f"h.{i}.{kind}"] = (np.concatenate(a_blocks), b, rank, alpha)
    kinds = {m.split(".", 2)[2] for m in modules}
    uniform = all(f"h.{i}.{k}" in modules for i in range(model_cfg.layers) for k in kinds)
    targets = sorted(kinds) if uniform else sorted(modules)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
              "inference_mode": True, "r": cfg.rank, "lora_alpha": cfg.alpha, "use_rslora": cfg.use_rslora,
              "lora_dropout": cfg.dropout, "target_modules": targets, "fan_in_fan_out": True, "bias": "none",
              "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
              "layers_to_transform": None, "layers_pattern": None,
              "rank_pattern": {re.escape(m): r for m, (_, _, r, _) in modules.items() if r != cfg.rank},
              "alpha_pattern": {re.escape(m): a for m, (_, _, _, a) in modules.items() if a != cfg.alpha}}
    tensors = {}
    for m, (a, b, _, _) in modules.items():
        tensors[f"base_model.model.transformer.{m}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"base_model.model.transformer.{m}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    return config, tensors


def _alpha(cfg: LoraConfig, site: str) -> float:
    return pattern_value(cfg.alpha_pattern, site, cfg.alpha)


def save_peft(folder, params, cfg: LoraConfig, model_cfg, *, mark_kind: str | None = "peft") -> None:
    """Write a PEFT folder (adapter_config.json + adapter_model.safetensors) that
    PeftModel.from_pretrained(GPT2LMHeadModel, folder) loads; built beside its place and swapped in whole."""
    from minilm import folders

    folder = Path(folder)
    config, tensors = from_minilm(params, cfg, model_cfg)
    check_finite(tensors, f"not writing {folder}")
    tmp = staging_dir(folder)
    try:
        save_file(tensors, tmp / ARRAYS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=1), encoding="utf-8")
        if mark_kind:
            folders.mark(tmp, mark_kind)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MinilmError(f"could not write {folder} ({getattr(e, 'strerror', None) or e}); nothing was "
                          f"written there") from None
    swap_in(tmp, folder)
