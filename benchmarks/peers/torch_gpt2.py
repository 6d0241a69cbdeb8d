"""The peer of minilm's train step: the same GPT-2 in PyTorch eager, Hugging Face transformers and PEFT.

    step = build(vocab=65, context=256, width=384, layers=6, heads=6, batch=8, mode="lora", rank=8,
                 targets="all-linear")
    step.run(3)      # wall seconds of each of 3 real AdamW steps

Same architecture as minilm/model.py: learned token and position embeddings, pre-LayerNorm blocks
(eps 1e-5), attention with biases, an MLP D -> 4D -> D with tanh-GELU ("gelu_new"), final LayerNorm,
output projection tied to the token embedding, no dropout. GPT-2's `c_attn` is our q, k, v
concatenated into one (D, 3D) matrix (a transformers `Conv1D`, which stores weights as (in, out), as we
do), so the parameter count is the same; `base_params` must equal ours, and run.py checks it.

Same step as minilm/train.py: next-token cross-entropy over B·T predicted tokens, global-norm gradient
clipping at 1.0, then AdamW (b1 0.9, b2 0.99, weight decay 0.1 on tensors with ndim >= 2 only). The
learning rate is a constant 1e-3 (ours follows a schedule; computing it costs nothing measurable).

LoRA is PEFT's, with our target sets mapped onto GPT-2's module names (TARGETS below). GPT-2 fuses q, k
and v into `c_attn`, so an adapter there is one rank-R update of the whole (D, 3D) matrix, with
R·(D + 3D) parameters, where ours puts a separate (D, R)·(R, D) adapter on each chosen matrix (2·R·D
each). README.md spells out what that changes for each target set.

`compile="compiled"` runs the model (forward and, through AOTAutograd, backward) under `torch.compile`
in its default mode (COMPILE_MODE below); loss, clipping and AdamW stay eager, as in most training
scripts (`torch.compile` of the optimizer step is a separate, rarer choice). Inductor on CPU writes C++
and needs a C++ compiler (g++) on the machine.

This module imports torch, transformers and peft at the top: import it only in a process that times
torch (benchmarks/peers/worker.py --side torch), never in one that runs JAX.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers

from minilm.contention import peak_rss_bytes

# Our target sets -> PEFT target_modules. PEFT matches a module when its qualified name equals an entry
# or ends with "." + entry, so "attn.c_proj" matches transformer.h.0.attn.c_proj and not mlp.c_proj,
# while a bare "c_proj" matches both. `adapted_modules` below lists what actually matched.
TARGETS = {
    "all-linear": ["c_attn", "c_proj", "c_fc"],         # q,k,v (fused), o, mlp.fc, mlp.proj
    "attn.*": ["attn.c_attn", "attn.c_proj"],           # q,k,v (fused), o
    "attn.q,attn.v": ["attn.c_attn"],                   # cannot split q,v out of the fused c_attn: q,k,v
}
# torch.compile's mode for the compiled peer. "default": what a user writes, torch.compile(model), and the
# mode PyTorch recommends for training. Not "reduce-overhead": CUDA graphs, nothing to gain on a CPU.
# Not "max-autotune": it benchmarks GEMM templates while compiling, minutes per graph on 2 cores, for
# products that already run in oneDNN/MKL at the machine's peak (the step's time is in the products).
COMPILE_MODE = "default"


def count(params) -> int:
    """Distinct parameters' scalars (a tied weight counts once, as model.parameters() yields it once)."""
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@dataclass
class TorchStep:
    """One model, optimizer and fixed batch; `run` takes real optimizer steps and times each."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list                     # the trainable parameters, for clipping
    inputs: torch.Tensor             # (B, T)   tokens read
    targets: torch.Tensor            # (B, T)   tokens predicted
    dtype: str                       # "float32" or "bfloat16" (autocast around forward + loss)
    info: dict = field(default_factory=dict)
    last_loss: float = float("nan")
    forward: object = None           # the model as called: torch.compile(model), or None: the model itself (eager)

    @property
    def tokens_per_step(self) -> int:
        return self.inputs.numel()

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            model = self.model if self.forward is None else self.forward
            logits = model(input_ids=self.inputs, use_cache=False).logits  # (B, T, V)
            # float32 loss in both modes, as ours; B·T predicted tokens, mean over them
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss

    def run(self, steps: int = 1) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            loss = self.step()
            times.append(time.perf_counter() - start)  # CPU eager: the step is done when it returns
        self.last_loss = float(loss.detach())
        return times

    def counts(self) -> dict:
        return {"trainable_params": count(self.params), "total_params": count(self.model.parameters()),
                "base_params": self.info["base_params"]}

    def memory(self) -> dict:
        state_bytes = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                          for t in s.values() if torch.is_tensor(t))
        return {"optimizer_state_bytes": state_bytes, "peak_rss_bytes": peak_rss_bytes()}


def build(*, vocab: int, context: int, width: int, layers: int, heads: int, batch: int, mode: str = "full",
          rank: int = 8, targets: str = "all-linear", dtype: str = "float32", lr: float = 1e-3,
          weight_decay: float = 0.1, seed: int = 0, threads: int | None = None,
          compile: str = "eager") -> TorchStep:
    """A GPT-2 LM of our shapes, float32 weights, full fine-tuning or PEFT LoRA (alpha = 2·rank), its
    AdamW and one fixed random batch of (batch, context + 1) tokens."""
    if mode not in ("full", "lora"):
        raise ValueError(f"mode {mode!r}: expected full or lora")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: expected float32 or bfloat16")
    if compile not in ("eager", "compiled"):
        raise ValueError(f"compile {compile!r}: expected eager or compiled")
    torch.set_num_threads(threads or os.cpu_count())
    torch.manual_seed(seed)
    transformers.logging.set_verbosity_error()

    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers, n_head=heads, n_inner=4 * width,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).to(torch.float32)  # default attention implementation
    attn_implementation = model.config._attn_implementation
    base_params = count(model.parameters())
    tied = model.lm_head.weight is model.transformer.wte.weight
    if not tied:  # run.py then checks the parameter count against minilm's own model
        raise AssertionError("GPT-2's output head is not tied to its token embedding, as minilm's is")

    info = {"attn_implementation": attn_implementation, "base_params": base_params, "mode": mode,
            "dtype": dtype, "compile": compile, "compile_mode": COMPILE_MODE if compile == "compiled" else None}
    if mode == "lora":
        import peft

        lora_config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                      target_modules=TARGETS[targets], fan_in_fan_out=True, bias="none")
        model = peft.get_peft_model(model, lora_config)
        adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if ".lora_A" in n})
        info.update(targets=targets, peft_target_modules=TARGETS[targets], adapted_modules=adapted,
                    adapted_kinds=sorted({".".join(n.split(".")[-2:]) for n in adapted}))
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))

    generator = torch.Generator().manual_seed(seed + 2)
    windows = torch.randint(0, vocab, (batch, context + 1), generator=generator)
    info.update(torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                transformers=transformers.__version__)
    if mode == "lora":
        import peft
        info["peft"] = peft.__version__
    return TorchStep(model, optimizer, params, windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), dtype,
                     info, forward=torch.compile(model, mode=COMPILE_MODE) if compile == "compiled" else None)
