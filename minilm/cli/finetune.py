"""`minilm finetune`: fine-tune a trained model on new text, fully (--full) or with LoRA (--lora SPEC).

Full fine-tuning trains every weight and writes a checkpoint that `minilm train --resume` continues;
LoRA trains adapters only (lora/) and writes an adapter folder. The two share one training loop
(fit.py) and one step (minilm.train): only the (trainable, frozen) split and the loss differ. The
`--lora` spec's keys and their help are LoraConfig's fields (lora/config.py). `--snapshot-every K` also keeps
what trains every K steps (OUT/snapshots/), the path a map of the word vectors draws (minilm/report_map.py).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from minilm.cli.flags import add_config_flags, describe_keys, given, refuse_adapter
from minilm.cli.mesh_flags import add_mesh_flags
from minilm.config import FINETUNE, LORA_LR, DataConfig, TrainConfig
from minilm.errors import MinilmError


def add_parser(commands) -> None:
    from lora import LoraConfig  # here, not at the top: lora imports JAX, which main() loads only after its restart

    p = commands.add_parser("finetune", help="fine-tune a trained model, fully or with LoRA",
                            description="Fine-tune BASE on a corpus or text file. --full trains every weight and "
                                        "writes OUT/checkpoint/; --lora trains low-rank adapters only and writes "
                                        "OUT/adapter/ (adapter_config.json + adapter_model.safetensors).")
    p.add_argument("base", metavar="BASE", help="the trained model: a run folder or its checkpoint/")
    p.add_argument("--full", action="store_true", help="train every parameter")
    p.add_argument("--lora", metavar="SPEC",
                   help="train LoRA adapters: comma-separated key=value, e.g. rank=8,alpha=16,targets=attn.q,attn.v. "
                        f"Keys: {describe_keys(LoraConfig)}")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/BASE-MODE-CORPUS)")
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier run saved in --out")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="K",
                   help="also keep what trains every K steps in OUT/snapshots/step-NNNNNN/, the path a map of the "
                        "word vectors draws: for --lora an adapter folder (the adapters alone), for --full a "
                        "checkpoint of the weights without optimizer state (default: 0, none)")
    add_config_flags(p, TrainConfig, f"training (lr defaults to {FINETUNE.lr:g} for --full, {LORA_LR:g} for --lora)",
                     lambda f: f"default: {getattr(FINETUNE, f.name)}")
    add_config_flags(p, DataConfig, "data (tokenized with the base model's vocabulary)")
    add_mesh_flags(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from minilm.cli import mesh_flags

    mesh_flags.start(args)  # before JAX touches a device: join the other processes, if there are any
    import jax

    import lora
    from lora.mesh import adapter_spec
    from minilm import checkpoint, folders, train
    from minilm.mesh import is_writer
    from minilm.cli.fit import check_memory, fit
    from minilm.cost import step_cost
    from minilm.data import check_fits, load_dataset
    from minilm.tree import combine, partition, size

    if args.full == (args.lora is not None):
        raise MinilmError("--full and --lora together" if args.full else
                          "choose how to fine-tune: --full, or --lora SPEC (e.g. --lora rank=8,alpha=16)")
    lora_cfg = lora.parse_spec(args.lora) if args.lora is not None else None
    train_over, data_over = given(args, TrainConfig), given(args, DataConfig)
    if "tokenizer" in data_over:
        raise MinilmError("--tokenizer: fine-tuning reads text with the base model's own tokenizer; drop the flag")
    train_cfg = dataclasses.replace(FINETUNE, **{**({"lr": LORA_LR} if lora_cfg else {}), **train_over})
    data_cfg = DataConfig(**data_over)
    refuse_adapter(args.base, "BASE", "fine-tune the model it was trained on (merge it first with `minilm merge` "
                   "to fine-tune the merged model)")
    base = checkpoint.load(args.base)
    out = folders.check_path(args.out or f"runs/{base.path.parent.name}-{'lora' if lora_cfg else 'full'}-"
                                         f"{data_cfg.corpus or Path(data_cfg.text or 'text').stem}")
    saved = out / ("adapter" if lora_cfg else "checkpoint")
    inputs = [Path(args.base), base.path]
    writer = is_writer()  # process 0 of several (or the only one): the others write nothing and check no output
    if writer:
        folders.check_output(saved, "adapter" if lora_cfg else "checkpoint", overwrite=args.overwrite, inputs=inputs)
    if writer and folders.kind_of(out) != "run":  # metrics.jsonl goes beside what it saves: never into a stranger's
        folders.check_output(out, "run", overwrite=args.overwrite, inputs=inputs)
    snapshots = out / "snapshots"
    if args.snapshot_every < 0:
        raise MinilmError(f"--snapshot-every {args.snapshot_every}: give a number of steps >= 1, or 0 for none")
    if args.snapshot_every and writer:  # --overwrite replaces only snapshots minilm wrote, never a stranger's folder
        folders.check_output(snapshots, "snapshots", overwrite=args.overwrite, inputs=inputs)
    data = load_dataset(data_cfg, seed=train_cfg.seed, tokenizer=base.tokenizer)
    check_fits(data, base.model_cfg.context, data_cfg.text or f"corpus {data_cfg.corpus!r}", data_cfg.val_fraction)
    cost = (lora.lora_step_cost(base.model_cfg, train_cfg.batch_size, lora_cfg, train_cfg.grad_accum) if lora_cfg
            else step_cost(base.model_cfg, train_cfg.batch_size, None, train_cfg.grad_accum))
    check_memory(cost, "fine-tuning this model")
    # LoRA's adapters are replicated on a mesh, its frozen base split like a full model's (lora/mesh.py)
    layout = mesh_flags.layout(args, train_cfg.batch_size, adapter_spec if lora_cfg else None)
    if writer:
        folders.lock(out)  # one run per folder, until this process ends
        folders.mark(out, "run")
    model_cfg = base.model_cfg
    adapter_key, run_key = jax.random.split(jax.random.key(train_cfg.seed))
    if lora_cfg:
        params = lora.attach(base.params, lora_cfg, key=adapter_key)
        trainable, frozen = lora.split(params, lora_cfg)
    else:
        trainable, frozen = partition(base.params, lambda name: True)
    state = train.start(trainable, frozen, train_cfg, key=run_key)
    if lora_cfg and writer:
        optimizer_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
        print(lora.format_summary(lora.summary(params, trainable), size(base.params), optimizer_bytes))

    def on_host(state):  # on a mesh, every process gathers the sharded state (a collective); process 0 writes it
        if layout is None:
            return state
        return dataclasses.replace(state, trainable=layout.gather(state.trainable), frozen=layout.gather(state.frozen),
                                   opt_state=layout.gather(state.opt_state))

    def save(state):
        state = on_host(state)
        if not writer:
            return
        if lora_cfg:
            lora.save_adapter(saved, combine(state.trainable, state.frozen), lora_cfg, model_cfg, base.tokenizer)
        else:
            checkpoint.save_training(saved, state, model_cfg=model_cfg, train_cfg=train_cfg, data_cfg=data_cfg,
                                     tokenizer=base.tokenizer)

    def snapshot(state):  # only what the map needs: the adapters, or the weights without optimizer state
        state = on_host(state)
        if not writer:
            return
        path = snapshots / f"step-{state.step:06d}"
        if lora_cfg:
            lora.save_adapter(path, combine(state.trainable, state.frozen), lora_cfg, model_cfg, base.tokenizer)
        else:
            checkpoint.save(path, params=combine(state.trainable, state.frozen), opt_state={}, model_cfg=model_cfg,
                            train_cfg=train_cfg, data_cfg=data_cfg, tokenizer=base.tokenizer,
                            state={"step": state.step, "data_cursor": state.data_cursor,
                                   "key": checkpoint.key_to_json(state.key), "snapshot": True})

    if args.snapshot_every and writer:
        if snapshots.exists():
            shutil.rmtree(snapshots)  # checked above: minilm's own snapshots of an earlier run
        snapshots.mkdir(parents=True)
        folders.mark(snapshots, "snapshots")
    return fit(state, data, model_cfg, train_cfg, out, save, resume=False, saved=saved,
               snapshot=snapshot if args.snapshot_every else None, snapshot_every=args.snapshot_every,
               resume_hint=None if lora_cfg else f"minilm train --out {out} --resume",
               sample_hint=f"minilm sample {base.path} --adapter {saved} --prompt '...'" if lora_cfg
               else f"minilm sample {out} --prompt '...'",
               loss=lora.loss_fn if lora_cfg else None, layout=layout)
