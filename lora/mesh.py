"""Where LoRA's arrays live on a device mesh: the frozen base like the full model's, the adapters whole.

minilm/mesh.py splits every parameter (with its gradient and Adam moments) over the mesh's `fsdp` axis.
LoRA's frozen base W is split the same way: it is most of the memory, and like a full model's weight it
is gathered where a layer uses it. The adapters A (d_in, R), B (R, d_out) and DoRA's magnitude (d_out,)
are replicated on every device instead, for three reasons:

* they are small (rank R of d_in + d_out per matrix, ~1% of the model at R = 8): splitting them would
  save little memory, and every layer would first have to gather them back, one more collective each;
* A's and B's rank axis R is rarely divisible by the mesh, and splitting d_in or d_out would put a
  transpose-shaped gather into LoRA's hand-written backward pass (lora/weight.py) for no gain;
* replicated, their gradients are summed over the devices by one all-reduce of the adapters' bytes
  alone: LoRA's gradient traffic is its trainable size, a small fraction of full fine-tuning's
  (`minilm bench --mesh` measures both).
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from lora.train import ADAPTER_LEAVES
from minilm.mesh import param_spec


def adapter_spec(name: str, shape: tuple[int, ...], fsdp: int) -> P:
    """minilm.mesh.param_spec for the base and everything not LoRA's; replicated adapters (see above).
    Works for optimizer-state names too (`1.0.mu.blocks.0.attn.q.w.lora_a`): they end like the parameter's."""
    if name.rsplit(".", 1)[-1] in ADAPTER_LEAVES:
        return P()
    return param_spec(name, shape, fsdp)
