"""What a LoRA train step costs, from the shapes alone, and a timed LoRA step to measure it against.

minilm/cost.py models a train step's matrix products for any set of frozen matrices that carry an
adapter; this file says which products LoRA's adapter adds (`adapter_products`, the products of
lora.weight.adapted_matmul) and which matrices a LoraConfig adapts, with what rank:

    merge            W + s·A B                               2·d_in·R·d_out, once per step
    backward         x A, (x A)ᵀ dY, dY Bᵀ, xᵀ (dY Bᵀ)         4·N·R·(d_in + d_out): thin and cheap in FLOPs

An adapter on the tied embedding adds A[ids] @ B to the lookup (a gather of A's rows, then a product)
and adapts the output projection like any matrix. `train_step_case` builds the compiled LoRA step
that minilm.bench times beside full fine-tuning.
"""

from __future__ import annotations

import jax

from lora.attach import attach
from lora.config import LoraConfig
from lora.targets import shared_a, site_ranks
from lora.train import loss_fn, split
from minilm.bench import TrainStepCase, compile_case
from minilm.config import ModelConfig, TrainConfig
from minilm.cost import Product, StepCost, step_cost
from minilm.model import init, param_shapes


def adapter_products(site: str, rows: int, d_in: int, d_out: int, rank: int) -> list[Product]:
    """The products an adapter of rank R on a (d_in, d_out) matrix adds to a step over `rows` tokens."""
    if site == "embed":  # the lookup: A[ids] (a gather) @ B
        return [Product("embed.B", "adapter", rows, rank, d_out, 1, True, True)]
    return [Product(site + part, "adapter", m, k, n, 1, False, False) for part, m, k, n in (
        (".merge", d_in, rank, d_out),  # W + s·A B, merged once for the forward product
        (".xA", rows, d_in, rank), (".dB", rank, rows, d_out), (".dyB", rows, d_out, rank), (".dA", d_in, rows, rank))]


def adapter_ranks(cfg: ModelConfig, lora_cfg: LoraConfig) -> dict[str, int]:
    """{site: rank} for a LoraConfig on a model of this shape (no arrays are made)."""
    return site_ranks(param_shapes(cfg), lora_cfg)


def adapter_shared_a(cfg: ModelConfig, lora_cfg: LoraConfig | None) -> frozenset[str]:
    """The sites whose A is another's (fuse_qkv: k and v use q's); none for None."""
    if lora_cfg is None or not lora_cfg.fuse_qkv:
        return frozenset()
    return frozenset(shared_a(adapter_ranks(cfg, lora_cfg)))


def adapters_step_cost(cfg: ModelConfig, batch: int, ranks: dict[str, int], grad_accum: int = 1,
                       shared: frozenset[str] = frozenset()) -> StepCost:
    """minilm.cost.step_cost with LoRA adapters of these ranks: A (d_in, R) and B (R, d_out) each train,
    an A shared with another site (`shared`) only once."""
    shapes = param_shapes(cfg)
    tok_shape = shapes["embed"]["tok"].shape
    params = 0
    for site, rank in ranks.items():
        d_in, d_out = tok_shape if site == "embed" else _matrix_shape(shapes, site)
        params += rank * d_out + (0 if site in shared else rank * d_in)
    return step_cost(cfg, batch, ranks, grad_accum, adapter_products=adapter_products, adapter_params=params)


def _matrix_shape(shapes, site: str) -> tuple[int, int]:
    _, layer, group, name = site.split(".")  # blocks.i.attn.q
    return shapes["blocks"][int(layer)][group][name]["w"].shape


def lora_step_cost(cfg: ModelConfig, batch: int, lora_cfg: LoraConfig | None, grad_accum: int = 1) -> StepCost:
    """The step cost under a LoraConfig (None: full fine-tuning): its sites, ranks and shared A's."""
    if lora_cfg is None:
        return step_cost(cfg, batch, None, grad_accum)
    return adapters_step_cost(cfg, batch, adapter_ranks(cfg, lora_cfg), grad_accum, adapter_shared_a(cfg, lora_cfg))


def describe(lora_cfg: LoraConfig) -> dict:
    """The adapter as minilm bench's JSON names it."""
    return {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets),
            "fuse_qkv": lora_cfg.fuse_qkv}


def train_step_case(model_cfg: ModelConfig, train_cfg: TrainConfig, lora_cfg: LoraConfig, *,
                    seed: int = 0) -> TrainStepCase:
    """minilm.bench's timed train step for LoRA: the adapters on a freshly initialised model train alone."""
    adapted = attach(init(model_cfg, key=jax.random.key(seed)), lora_cfg, key=jax.random.key(seed + 1))
    trainable, frozen = split(adapted, lora_cfg)
    predicted = lora_step_cost(model_cfg, train_cfg.batch_size, lora_cfg, train_cfg.grad_accum)
    return compile_case(model_cfg, train_cfg, trainable, frozen, loss_fn, predicted, adapter=describe(lora_cfg),
                        seed=seed)
