"""Training runs on 8 emulated CPU devices, for tests/test_mesh.py: one process does every comparison.

Run as `python tests/mesh_runs.py OUT_JSON TMP_DIR`: XLA_FLAGS must be set before JAX is imported, which
is why this is a script of its own. Writes the losses of 20 steps on one device and on the meshes
8x1, 4x2 and 1x8, for full fine-tuning and LoRA, and checkpoint round trips between layouts.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import lora  # noqa: E402
from lora.mesh import adapter_spec  # noqa: E402
from minilm import checkpoint, mesh, train  # noqa: E402
from minilm.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from minilm.data import load_dataset  # noqa: E402
from minilm.model import init  # noqa: E402
from minilm.tree import named_leaves, partition  # noqa: E402

MESHES = {"8x1": {"data": 8, "fsdp": 1}, "4x2": {"data": 4, "fsdp": 2}, "1x8": {"data": 1, "fsdp": 8}}


def main(out_json: str, tmp: str) -> None:
    data = load_dataset(DataConfig(corpus="arithmetic", corpus_size=600), seed=3)
    # widths divisible by 8, so that 1x8 splits every matrix; B = 8 rows, one per device
    model_cfg = ModelConfig(vocab_size=data.tokenizer.size, context=16, width=32, layers=2, heads=4, mlp_ratio=2)
    train_cfg = TrainConfig(steps=20, batch_size=8, lr=1e-2, min_lr=1e-3, warmup=0.1, eval_every=10, eval_batches=2,
                            checkpoint_every=10, seed=5)
    params = init(model_cfg, key=jax.random.key(0))
    lora_cfg = lora.parse_spec("rank=4,alpha=8,targets=all-linear")
    layouts = {name: {"full": mesh.Layout(mesh.make_mesh(sizes, 8)),
                      "lora": mesh.Layout(mesh.make_mesh(sizes, 8), adapter_spec)} for name, sizes in MESHES.items()}

    def start(mode):
        if mode == "full":
            trainable, frozen = partition(params, lambda name: True)
        else:
            trainable, frozen = lora.split(lora.attach(params, lora_cfg, key=jax.random.key(1)), lora_cfg)
        return train.start(trainable, frozen, train_cfg, key=jax.random.key(2))

    def run(state, mode, layout, stop=20):
        """Train from `state` towards step 20, stopping after step `stop`: (state, the losses of its steps)."""
        loss = train.loss_fn if mode == "full" else lora.loss_fn
        losses = []
        for state, metrics in train.run(state, data, model_cfg, train_cfg, loss, layout):
            losses.append(metrics["loss"])
            if state.step == stop:
                break
        return state, losses

    result = {"losses": {}}
    for mode in ("full", "lora"):
        result["losses"][mode] = {"1": run(start(mode), mode, None)[1]}
        for name in MESHES:
            result["losses"][mode][name] = run(start(mode), mode, layouts[name][mode])[1]

    # checkpoints across layouts (full fine-tuning: a checkpoint holds the optimizer state too)
    def save(state, layout, path):
        if layout is not None:
            state = replace(state, trainable=layout.gather(state.trainable), frozen=layout.gather(state.frozen),
                            opt_state=layout.gather(state.opt_state))
        checkpoint.save_training(path, state, model_cfg=model_cfg, train_cfg=train_cfg,
                                 data_cfg=DataConfig(corpus="arithmetic", corpus_size=600), tokenizer=data.tokenizer)
        return state

    def resume(path):
        return checkpoint.restore_training(checkpoint.load(path), train_cfg)

    sharded = layouts["4x2"]["full"]
    half, _ = run(start("full"), "full", sharded, stop=10)
    gathered = save(half, sharded, Path(tmp) / "sharded")
    loaded = resume(Path(tmp) / "sharded")
    same = all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves((loaded.trainable, loaded.opt_state)),
                                                                   jax.tree.leaves((gathered.trainable,
                                                                                    gathered.opt_state))))
    result["sharded_checkpoint_exact"] = same and loaded.step == 10 and loaded.data_cursor == half.data_cursor
    result["sharded_resumed_on_mesh"] = run(loaded, "full", sharded)[1]
    result["sharded_resumed_on_one"] = run(resume(Path(tmp) / "sharded"), "full", None)[1]
    # and the other way: saved on one device, placed on the mesh exactly, resumed there
    half, _ = run(start("full"), "full", None, stop=10)
    save(half, None, Path(tmp) / "single")
    loaded = resume(Path(tmp) / "single")
    placed = sharded.place(loaded.trainable)
    result["placed_exact"] = all(np.array_equal(np.asarray(a), np.asarray(b))
                                 for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(loaded.trainable)))
    result["placed_split"] = all(len(x.sharding.device_set) == 8 and x.addressable_shards[0].data.size * 2 == x.size
                                 for name, x in named_leaves(placed).items() if name.endswith(".w"))
    result["single_resumed_on_mesh"] = run(loaded, "full", sharded)[1]
    Path(out_json).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
