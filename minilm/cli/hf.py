"""`minilm import-hf` and `minilm export-hf`: Hugging Face GPT-2 folders in and out (minilm/hf.py does the
mapping; this module checks the folders and writes them by minilm's rules, minilm/folders.py).

    minilm import-hf gpt2 --out runs/gpt2      a folder from save_pretrained or huggingface-cli download
                                               -> a minilm run folder: sample, finetune, compare read it
    minilm export-hf runs/tuned --out tuned-hf a minilm checkpoint -> a folder transformers loads:
                                               GPT2LMHeadModel.from_pretrained('tuned-hf')

Neither command touches the network: getting the weights is the user's step.
"""

from __future__ import annotations

from pathlib import Path

IMPORT_EPILOG = ("Get a folder first, e.g. `huggingface-cli download gpt2 --local-dir gpt2` (config.json, "
                 "model.safetensors, tokenizer files), or model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR) "
                 "in Python. Then: minilm import-hf gpt2 --out runs/gpt2; minilm sample runs/gpt2 --prompt 'Hello'.")


def add_parser(commands) -> None:
    p = commands.add_parser(
        "import-hf", help="import a Hugging Face GPT-2 folder as a minilm checkpoint",
        description="Read a GPT-2 folder written by transformers' save_pretrained (config.json; model.safetensors or "
                    "sharded model-*.safetensors with model.safetensors.index.json; tokenizer.json, or vocab.json and "
                    "merges.txt) and write it as a minilm run folder, OUT/checkpoint, which sample, finetune, merge "
                    "and compare read like any other. The logits are transformers' own (float32 rounding aside). "
                    "A config minilm cannot compute (an untied head, scale_attn_by_inverse_layer_idx, another "
                    "model_type, ...) is refused, naming the key. pytorch_model.bin (a pickle) is never read. "
                    "No network.",
        epilog=IMPORT_EPILOG)
    p.add_argument("hf_dir", metavar="HF_DIR", help="the Hugging Face model folder (local; nothing is downloaded)")
    p.add_argument("--out", metavar="RUN", required=True, help="the minilm run folder to write (RUN/checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out run folder minilm wrote")
    p.set_defaults(run=run_import)

    p = commands.add_parser(
        "export-hf", help="export a minilm checkpoint as a Hugging Face GPT-2 folder",
        description="Write RUN's model as a Hugging Face GPT-2 folder: config.json, model.safetensors, and the "
                    "tokenizer files (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json), which "
                    "transformers' GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained load with the "
                    "same logits and token ids; a char or word vocabulary becomes a WordLevel tokenizer.json. The "
                    "model needs MLPs (GPT-2 has no attention-only blocks). To export a LoRA fine-tune, merge it first: "
                    "minilm merge BASE ADAPTER --out MERGED.",
        epilog="example: minilm export-hf runs/gpt2 --out gpt2-again; then in Python: "
               "GPT2LMHeadModel.from_pretrained('gpt2-again')")
    p.add_argument("run_dir", metavar="RUN", help="a minilm run folder or its checkpoint/")
    p.add_argument("--out", metavar="HF_DIR", required=True, help="the Hugging Face folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder an earlier export-hf wrote")
    p.set_defaults(run=run_export)


def run_import(args) -> int:
    import jax

    from minilm import checkpoint, folders, hf
    from minilm.config import DataConfig, TrainConfig

    source = Path(args.hf_dir)
    out = folders.check_output(args.out, "run", overwrite=args.overwrite, inputs=[source])
    cfg, params, tokenizer = hf.load(source)  # every input is checked before anything is written
    folders.lock(out)
    folders.mark(out, "run")
    checkpoint.save(out / "checkpoint", params=params, opt_state={}, model_cfg=cfg, train_cfg=TrainConfig(),
                    data_cfg=DataConfig(), tokenizer=tokenizer,
                    state={"step": 0, "data_cursor": 0, "key": checkpoint.key_to_json(jax.random.key(0)),
                           "imported_from": str(source.resolve())})
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"imported {source} ({n:,} parameters; {cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, "
          f"context {cfg.context}, vocabulary {cfg.vocab_size}) -> {out}\n"
          f"  sample with minilm sample {out} --prompt '...'")
    return 0


def run_export(args) -> int:
    from minilm import checkpoint, folders, hf
    from minilm.cli.flags import refuse_adapter

    refuse_adapter(args.run_dir, "RUN", "merge it into its base first (minilm merge BASE ADAPTER --out MERGED), "
                                        "then export MERGED")
    ckpt = checkpoint.load(args.run_dir)
    out = folders.check_output(args.out, "hf", overwrite=args.overwrite, inputs=[args.run_dir, ckpt.path])
    hf.save(out, ckpt.params, ckpt.model_cfg, ckpt.tokenizer)
    print(f"exported {ckpt.path} -> {out}\n"
          f"  load with transformers: GPT2LMHeadModel.from_pretrained('{out}'), AutoTokenizer.from_pretrained('{out}')")
    return 0
