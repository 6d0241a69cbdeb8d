"""`minilm train`: train a model from scratch on a corpus or a text file, or --resume a saved run.

Every ModelConfig, TrainConfig and DataConfig field is a flag (flags.py); a flag left out keeps the
preset's value, or on --resume the checkpoint's. A resumed run continues bit-identically; only the
training flags (--steps, say) may change, never the model, the data or the seed.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from minilm.cli.flags import add_config_flags, check_unchanged, given, preset_note
from minilm.cli.mesh_flags import add_mesh_flags
from minilm.config import PRESETS, DataConfig, ModelConfig, TrainConfig, preset, to_dict
from minilm.errors import MinilmError


def add_parser(commands) -> None:
    p = commands.add_parser("train", help="train a model from scratch (or --resume one)",
                            description="Train a GPT on a built-in corpus (--corpus) or a text file (--text). "
                                        "Writes OUT/checkpoint/ and OUT/metrics.jsonl.")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny",
                   help="model and training sizes to start from; other flags override them (default: tiny)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/PRESET-CORPUS)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out, bit-identically; --steps may extend it")
    p.add_argument("--overwrite", action="store_true", help="replace a run already saved in --out")
    p.add_argument("--dry-run", action="store_true",
                   help="check every flag and file, print the resolved configs as JSON, write nothing")
    add_config_flags(p, ModelConfig, "model (defaults from --preset)", preset_note(0))
    add_config_flags(p, TrainConfig, "training (defaults from --preset)", preset_note(1))
    add_config_flags(p, DataConfig, "data")
    add_mesh_flags(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from minilm.cli import mesh_flags

    mesh_flags.start(args)  # before JAX touches a device: join the other processes, if there are any
    import jax

    from minilm import checkpoint, folders, train
    from minilm.mesh import is_writer
    from minilm.cli.fit import check_memory, check_size, fit
    from minilm.cost import step_cost
    from minilm.data import check_fits, load_dataset
    from minilm.model import init
    from minilm.tree import partition

    model_over, train_over, data_over = given(args, ModelConfig), given(args, TrainConfig), given(args, DataConfig)
    if args.resume and args.overwrite:
        raise MinilmError("--resume and --overwrite contradict each other; pass one of them")
    default_name = data_over.get("corpus") or Path(data_over.get("text") or "text").stem
    out = Path(args.out or f"runs/{args.preset}-{default_name}")
    folders.check_path(out)
    writer = is_writer()  # process 0 of several (or the only one): the others write nothing and check no output
    if args.resume:
        if not checkpoint.is_complete(out):
            checkpoint.resolve(out)  # its own message when nothing is there, or only a first save's leftovers
            raise MinilmError(f"--resume: {out} holds no checkpoint (no checkpoint/ with a state.json); give the "
                              f"--out of a `minilm train` run, or drop --resume to start one")
        ckpt = checkpoint.load(out)
        check_unchanged(ckpt.model_cfg, model_over, "model config")
        check_unchanged(ckpt.data_cfg, data_over, "data config")
        check_unchanged(ckpt.train_cfg, {k: v for k, v in train_over.items() if k == "seed"}, "seed")
        model_cfg, data_cfg = ckpt.model_cfg, ckpt.data_cfg
        train_cfg = dataclasses.replace(ckpt.train_cfg, **train_over)
        state = checkpoint.restore_training(ckpt, train_cfg)
        if state.step >= train_cfg.steps:
            raise MinilmError(f"the run in {out} is at step {state.step} and --steps is {train_cfg.steps}: nothing "
                              f"to train; pass --steps N with N > {state.step} to extend it")
        if folders.kind_of(out) is None and writer:
            warnings.warn(f"{out} was written before minilm marked its folders; marking it as a run now")
    else:
        completed = checkpoint.is_complete(out / "checkpoint")  # checkpoint.old counts: it is recoverable
        if completed and not args.overwrite and writer:
            raise MinilmError(f"{out} already holds a training run; pass --resume to continue it, "
                              f"--overwrite to replace it, or choose another --out")
        if writer and (completed or folders.kind_of(out) != "run"):  # a run that saved nothing yet may start again
            folders.check_output(out, "run", overwrite=args.overwrite)
        base_model, base_train = preset(args.preset)
        model_cfg = dataclasses.replace(base_model, **model_over)  # check every config before reading data
        train_cfg = dataclasses.replace(base_train, **train_over)
        data_cfg = DataConfig(**data_over)
    if args.resume:
        data = load_dataset(data_cfg, seed=train_cfg.seed, tokenizer=ckpt.tokenizer)
    else:
        data = load_dataset(data_cfg, seed=train_cfg.seed)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=data.tokenizer.size)
        check_size(model_cfg, train_cfg.batch_size, "this model")
        check_memory(step_cost(model_cfg, train_cfg.batch_size, None, train_cfg.grad_accum), "this model")
    check_fits(data, model_cfg.context, data_cfg.text or f"corpus {data_cfg.corpus!r}", data_cfg.val_fraction)
    layout = mesh_flags.layout(args, train_cfg.batch_size)
    if args.dry_run:  # every input is checked
        print(json.dumps({"out": str(out), "model": to_dict(model_cfg), "train": to_dict(train_cfg),
                          "data": to_dict(data_cfg)}))
        return 0
    # every input is checked: from here on the folder is this process's
    if writer:
        folders.lock(out)  # one run per folder, until this process ends
        if checkpoint.recover(out / "checkpoint"):
            warnings.warn(f"recovered {out / 'checkpoint'} from checkpoint.old, left by an interrupted save")
        folders.mark(out, "run")
    if not args.resume:
        init_key, train_key = jax.random.split(jax.random.key(train_cfg.seed))
        trainable, frozen = partition(init(model_cfg, key=init_key), lambda name: True)
        state = train.start(trainable, frozen, train_cfg, key=train_key)

    def save(state):  # on a mesh, every process gathers the sharded state (a collective); process 0 writes it
        if layout is not None:
            state = dataclasses.replace(state, trainable=layout.gather(state.trainable),
                                        frozen=layout.gather(state.frozen), opt_state=layout.gather(state.opt_state))
        if writer:
            checkpoint.save_training(out / "checkpoint", state, model_cfg=model_cfg, train_cfg=train_cfg,
                                     data_cfg=data_cfg, tokenizer=data.tokenizer)

    return fit(state, data, model_cfg, train_cfg, out, save, resume=args.resume, saved=out / "checkpoint",
               resume_hint=f"minilm train --out {out} --resume", sample_hint=f"minilm sample {out} --prompt '...'",
               layout=layout)
