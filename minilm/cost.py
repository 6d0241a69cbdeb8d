"""What a train step must cost, from the shapes alone: why LoRA is (or is not) faster than full.

Every matrix product of the forward pass is listed once (`products`), with whether each operand's
gradient is needed. The backward pass then costs, per product (m, k) @ (k, n) = 2mkn FLOPs forward:

    input gradient   dX = dY Wᵀ      2mkn   if X depends on anything trainable
    weight gradient  dW = Xᵀ dY      2mkn   if W itself is trainable          <- LoRA removes these
    LoRA extra       per adapted matrix: merging W + s·A B (2·d_in·R·d_out), then in the backward pass
                     x A, (x A)ᵀ dY, dY Bᵀ, xᵀ (dY Bᵀ): 4·N·R·(d_in + d_out), thin and cheap in FLOPs

so full fine-tuning does ~3x the forward FLOPs and LoRA ~2x (plus the adapters), and the FLOP ratio
LoRA/full can never fall below ~2/3: frozen layers still run forward and still pass gradients down.
Everything else -- LayerNorm, GELU, softmax, residual adds, the optimizer -- is not a matrix product;
it moves bytes more than it computes, costs the same for LoRA as for full (but the optimizer), and
so pulls the time ratio further towards 1 (`elementwise_bytes`: an estimate of the bytes it moves).

The list is exact: tests/test_cost.py checks it against the matrix products in JAX's own trace of
the train step. Attention products follow attention.causal_self_attention (blocks of queries that see
only the keys up to their block's end).
"""

from __future__ import annotations

from dataclasses import dataclass

from minilm.attention import QUERY_BLOCK
from minilm.config import ModelConfig
from minilm.model import param_shapes
from minilm.tree import size

F32 = 4  # bytes per float32


@dataclass(frozen=True)
class Product:
    """(m, k) @ (k, n), `count` times, in the forward pass."""

    name: str
    kind: str        # linear (activation @ weight) | attention (activation @ activation) | lora (adapter)
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

    def seconds(self, matmul_flops_per_s: float, bytes_per_s: float) -> float:
        """Roofline estimate: the products at the machine's matmul speed, the rest at its memory speed."""
        return self.flops / matmul_flops_per_s + self.elementwise_bytes / bytes_per_s

    def per_token(self) -> dict:
        return {k: v / self.tokens for k, v in (("forward", self.forward), ("input_grad", self.input_grad),
                                                ("weight_grad", self.weight_grad), ("lora_extra", self.lora_extra))}


def attention_blocks(T: int, block: int = QUERY_BLOCK) -> list[tuple[int, int]]:
    """(queries, keys seen) per query block, as causal_self_attention computes them."""
    return [(min(start + block, T) - start, min(start + block, T)) for start in range(0, T, block)]


def products(cfg: ModelConfig, batch: int, adapters: dict[str, int] | None = None) -> list[Product]:
    """Every matrix product of one forward pass over `batch` sequences of cfg.context tokens.

    adapters None: full fine-tuning, every parameter trainable. Otherwise {site: rank} for LoRA, e.g.
    {"blocks.0.attn.q": 8, "embed": 4}: only the adapters train (biases, LayerNorms frozen).
    """
    full = adapters is None
    adapters = adapters or {}
    T, D, F, V, H = cfg.context, cfg.width, cfg.mlp_width, cfg.vocab_size, cfg.heads
    K, N = cfg.head_size, batch * cfg.context
    out: list[Product] = []

    def linear(name, x_grad, d_in, d_out, rank=None):
        """x @ W, or x @ (W + s·A B) with an adapter (lora.weight.adapted_matmul); returns whether the
        output depends on something trainable."""
        rank = rank or adapters.get(name)
        out.append(Product(name, "linear", N, d_in, d_out, 1, x_grad, full))
        if rank:  # merge A B once; backward by hand: x A, (x A)ᵀ dy, dy Bᵀ, xᵀ (dy Bᵀ)
            out.append(Product(name + ".merge", "lora", d_in, rank, d_out, 1, False, False))
            out.extend(Product(name + part, "lora", m, k, n, 1, False, False) for part, m, k, n in (
                (".xA", N, d_in, rank), (".dB", rank, N, d_out), (".dyB", N, d_out, rank), (".dA", d_in, N, rank)))
        return x_grad or full or bool(rank)

    # The embedding lookup is a gather, not a product; an adapter on it adds A[ids] @ B.
    x = full or "embed" in adapters
    if "embed" in adapters:
        out.append(Product("embed.B", "lora", N, adapters["embed"], D, 1, True, True))
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
    # Tied output projection: logits = LN(x) @ Eᵀ; with an adapter on E, W'ᵀ = Eᵀ + s Bᵀ Aᵀ.
    linear("unembed", x or full, D, V, rank=adapters.get("embed"))
    return out


def step_cost(cfg: ModelConfig, batch: int, adapters: dict[str, int] | None = None, grad_accum: int = 1,
              shared_a: frozenset[str] = frozenset()) -> StepCost:
    """FLOPs and bytes of one optimizer step over grad_accum micro-batches of `batch` sequences.

    `shared_a`: adapted matrices whose A is another's (LoRA's fuse_qkv); their A is counted once."""
    forward = input_grad = weight_grad = lora_extra = 0
    listed = products(cfg, batch, adapters)
    for p in listed:
        backward_lhs = p.flops if p.lhs_grad else 0
        backward_rhs = p.flops if p.rhs_grad else 0
        if p.kind == "lora":
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
    # each adapter is A (d_in, R) and B (R, d_out): the shapes of its merge product (d_in, R) @ (R, d_out)
    adapter_params = sum(p.k * (p.n + (0 if p.name.removesuffix(".merge") in shared_a else p.m))
                         for p in listed if p.name.endswith(".merge"))
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


def lora_step_cost(cfg: ModelConfig, batch: int, lora_cfg, grad_accum: int = 1) -> StepCost:
    """`step_cost` for a lora.LoraConfig (None: full fine-tuning): its sites, ranks and shared A's."""
    if lora_cfg is None:
        return step_cost(cfg, batch, None, grad_accum)
    ranks = adapter_ranks(cfg, lora_cfg)
    return step_cost(cfg, batch, ranks, grad_accum, _shared(ranks, lora_cfg))


def adapter_ranks(cfg: ModelConfig, lora_cfg) -> dict[str, int]:
    """{site: rank} for a lora.LoraConfig on a model of this shape (no arrays are made)."""
    from lora.adapter import site_ranks  # lora builds on minilm; imported only when needed

    return site_ranks(param_shapes(cfg), lora_cfg)


def adapter_shared_a(cfg: ModelConfig, lora_cfg) -> frozenset[str]:
    """The sites whose A is another's under a lora.LoraConfig (fuse_qkv: k and v use q's); none for None."""
    return frozenset() if lora_cfg is None else _shared(adapter_ranks(cfg, lora_cfg), lora_cfg)


def _shared(sites, lora_cfg) -> frozenset[str]:
    from lora.adapter import shared_a

    return frozenset(shared_a(sites)) if lora_cfg.fuse_qkv else frozenset()
