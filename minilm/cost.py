"""What a train step must cost, from the shapes alone: why LoRA is (or is not) faster than full.

Every matrix product of the forward pass is listed once (`products`), with whether each operand's
gradient is needed. The backward pass then costs, per product (m, k) @ (k, n) = 2mkn FLOPs forward:

    input gradient   dX = dY Wᵀ      2mkn   if X depends on anything trainable
    weight gradient  dW = Xᵀ dY      2mkn   if W itself is trainable          <- LoRA removes these
    adapter extra    what an adapter on a frozen matrix adds (lora/cost.py lists LoRA's products)

so full fine-tuning does ~3x the forward FLOPs and LoRA ~2x (plus the adapters), and the FLOP ratio
LoRA/full can never fall below ~2/3: frozen layers still run forward and still pass gradients down.
Everything else -- LayerNorm, GELU, softmax, residual adds, the optimizer -- is not a matrix product;
it moves bytes more than it computes, costs the same for LoRA as for full (but the optimizer), and
so pulls the time ratio further towards 1 (`elementwise_bytes`: an estimate of the bytes it moves).

This file knows nothing of LoRA: an adapter is a site name, a rank and the products it adds, given by
the caller (`adapter_products`; lora/cost.py gives LoRA's). The list is exact: tests/test_cost.py
checks it against the matrix products in JAX's own trace of the train step. Attention products follow
attention.causal_self_attention (blocks of queries that see only the keys up to their block's end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from minilm.attention import QUERY_BLOCK
from minilm.config import ModelConfig
from minilm.model import param_shapes
from minilm.tree import size

F32 = 4  # bytes per float32


@dataclass(frozen=True)
class Product:
    """(m, k) @ (k, n), `count` times, in the forward pass."""

    name: str
    kind: str        # linear (activation @ weight) | attention (activation @ activation) | adapter
    m: int
    k: int
    n: int
    count: int
    lhs_grad: bool   # is the left operand's gradient needed (does it depend on something trainable)?
    rhs_grad: bool   # is the right operand's? For a linear layer: is W trainable?

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one train step by kind, and bytes of each kind of state."""

    forward: int          # products of the forward pass (no adapters)
    input_grad: int       # gradients with respect to activations (dX = dY Wᵀ, and attention's)
    weight_grad: int      # gradients with respect to trainable weights (dW = Xᵀ dY)
    lora_extra: int       # every product the adapters add, forward and backward
    elementwise_bytes: int  # estimate: bytes moved by the non-matmul work (norms, GELU, softmax, optimizer)
    params_bytes: int
    trainable_params: int
    activation_bytes: int  # estimate: what the forward pass keeps for the backward pass
    tokens: int

    @property
    def gradient_bytes(self) -> int:
        return F32 * self.trainable_params

    @property
    def optimizer_bytes(self) -> int:  # AdamW: two moments per trainable scalar
        return 2 * F32 * self.trainable_params

    @property
    def flops(self) -> int:
        return self.forward + self.input_grad + self.weight_grad + self.lora_extra

    @property
    def memory_bytes(self) -> int:
        """What a train step holds at once: parameters, gradients, optimizer state and the activations
        kept for the backward pass (a lower bound: XLA's temporaries come on top)."""
        return self.params_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def seconds(self, matmul_flops_per_s: float, bytes_per_s: float) -> float:
        """Roofline estimate: the products at the machine's matmul speed, the rest at its memory speed."""
        return self.flops / matmul_flops_per_s + self.elementwise_bytes / bytes_per_s

    def per_token(self) -> dict:
        return {k: v / self.tokens for k, v in (("forward", self.forward), ("input_grad", self.input_grad),
                                                ("weight_grad", self.weight_grad), ("lora_extra", self.lora_extra))}


def attention_blocks(T: int, block: int = QUERY_BLOCK) -> list[tuple[int, int]]:
    """(queries, keys seen) per query block, as causal_self_attention computes them."""
    return [(min(start + block, T) - start, min(start + block, T)) for start in range(0, T, block)]


# (site, rows N, d_in, d_out, rank) -> the products an adapter on that matrix adds; the site "embed" is the
# embedding lookup (a gather of rows, d_in = V), "unembed" the tied output projection
AdapterProducts = Callable[[str, int, int, int, int], list["Product"]]


def products(cfg: ModelConfig, batch: int, adapters: dict[str, int] | None = None,
             adapter_products: AdapterProducts | None = None) -> list[Product]:
    """Every matrix product of one forward pass over `batch` sequences of cfg.context tokens.

    adapters None: full fine-tuning, every parameter trainable. Otherwise {site: rank}, e.g.
    {"blocks.0.attn.q": 8, "embed": 4}: only adapters on those frozen matrices train (biases, LayerNorms
    frozen), each adding the products `adapter_products` lists for it.
    """
    full = adapters is None
    adapters = adapters or {}
    if adapters and adapter_products is None:
        raise ValueError("adapters need adapter_products: the products each one adds (see lora/cost.py)")
    T, D, F, V, H = cfg.context, cfg.width, cfg.mlp_width, cfg.vocab_size, cfg.heads
    K, N = cfg.head_size, batch * cfg.context
    out: list[Product] = []

    def linear(name, x_grad, d_in, d_out, rank=None):
        """x @ W, with an adapter's products if the site has one; returns whether the output depends on
        something trainable."""
        rank = rank or adapters.get(name)
        out.append(Product(name, "linear", N, d_in, d_out, 1, x_grad, full))
        if rank:
            out.extend(adapter_products(name, N, d_in, d_out, rank))
        return x_grad or full or bool(rank)

    # The embedding lookup is a gather, not a product; an adapter on it may add products of its own.
    x = full or "embed" in adapters
    if "embed" in adapters:
        out.extend(adapter_products("embed", N, V, D, adapters["embed"]))
    for i in range(cfg.layers):
        name = f"blocks.{i}"
        ln1 = x or full  # LayerNorm's scale and bias are trainable in full fine-tuning
        q, k, v = (linear(f"{name}.attn.{m}", ln1, D, D) for m in "qkv")
        for queries, keys in attention_blocks(T):
            out.append(Product(f"{name}.attn.scores", "attention", queries, K, keys, batch * H, q, k))
            out.append(Product(f"{name}.attn.mix", "attention", queries, keys, K, batch * H, q or k, v))
        x = linear(f"{name}.attn.o", q or k or v, D, D) or x
        ln2 = x or full
        hidden = linear(f"{name}.mlp.fc", ln2, D, F)
        x = linear(f"{name}.mlp.proj", hidden, F, D) or x
    # Tied output projection: logits = LN(x) @ Eᵀ; an adapter on E adapts it too.
    linear("unembed", x or full, D, V, rank=adapters.get("embed"))
    return out


def step_cost(cfg: ModelConfig, batch: int, adapters: dict[str, int] | None = None, grad_accum: int = 1, *,
              adapter_products: AdapterProducts | None = None, adapter_params: int = 0) -> StepCost:
    """FLOPs and bytes of one optimizer step over grad_accum micro-batches of `batch` sequences.

    With `adapters` ({site: rank}, see `products`), only the adapters' `adapter_params` scalars train."""
    forward = input_grad = weight_grad = lora_extra = 0
    listed = products(cfg, batch, adapters, adapter_products)
    for p in listed:
        backward_lhs = p.flops if p.lhs_grad else 0
        backward_rhs = p.flops if p.rhs_grad else 0
        if p.kind == "adapter":
            lora_extra += p.flops + backward_lhs + backward_rhs
        elif p.kind == "attention":
            forward += p.flops
            input_grad += backward_lhs + backward_rhs
        else:
            forward += p.flops
            input_grad += backward_lhs
            weight_grad += backward_rhs
    T, D, F, V, H, L = cfg.context, cfg.width, cfg.mlp_width, cfg.vocab_size, cfg.heads, cfg.layers
    N = batch * T
    keys = sum(q * k for q, k in attention_blocks(T)) / T  # mean keys computed per query
    params = size(param_shapes(cfg))
    trainable = params if adapters is None else adapter_params
    # Elementwise passes per token, each element read or written once per pass (forward + backward):
    # LayerNorm ~8 passes of D (x2 per block, + final), residual adds 2 of D, GELU ~8 of F,
    # softmax ~6 per score and mask, bias adds 6; cross-entropy ~6 of V. Then AdamW ~12 per trainable.
    per_token = L * (2 * 8 * D + 2 * 2 * D + 8 * F + 6 * H * keys + 6 * D + F) + 8 * D + 6 * V
    elementwise = F32 * (per_token * N + 12 * trainable) * grad_accum
    # Kept for backward per token and layer: LN outputs, q k v, attention output, fc pre/post GELU,
    # residual stream; and the probabilities per head and key.
    activations = F32 * N * (L * (2 * D + 3 * D + D + 2 * F + 2 * D + H * keys) + D + V)
    return StepCost(
        forward=forward * grad_accum, input_grad=input_grad * grad_accum, weight_grad=weight_grad * grad_accum,
        lora_extra=lora_extra * grad_accum, elementwise_bytes=int(elementwise),
        params_bytes=F32 * (params + adapter_params), trainable_params=trainable,
        activation_bytes=int(activations), tokens=N * grad_accum)



def traffic(*, data: int, fsdp: int, gathered_bytes: int, scattered_grad_bytes: int,
            replicated_grad_bytes: int) -> dict[str, int]:
    """Predicted bytes one train step's collectives handle on a (data, fsdp) mesh (minilm/mesh.py), per device.

    Args:
        gathered_bytes: the whole size of the parameters split over fsdp (trainable and frozen): each is
            all-gathered once where the forward pass uses it (and kept for the backward pass).
        scattered_grad_bytes: the whole size of the trainable parameters split over fsdp: their gradient
            is summed over the fsdp devices and each keeps its slice (a reduce-scatter), then the slices
            are summed over `data` (an all-reduce of 1/fsdp of them).
        replicated_grad_bytes: the trainable parameters kept whole (all of them when fsdp = 1, LoRA's
            adapters always): their gradient is summed over every device (an all-reduce).
    So the gradient traffic is the trainable size: LoRA's is its adapters', a small fraction of full
    fine-tuning's; and with fsdp > 1 the frozen base is gathered all the same. (Scalars such as the loss
    and the gradient norm are left out.)
    """
    devices = data * fsdp
    sharded = fsdp > 1
    return {"all-gather": gathered_bytes if sharded else 0,
            "reduce-scatter": scattered_grad_bytes if sharded else 0,
            "all-reduce": (replicated_grad_bytes if devices > 1 else 0)
                          + (scattered_grad_bytes // fsdp if sharded and data > 1 else 0)}
