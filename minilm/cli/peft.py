"""`minilm import-peft` and `minilm export-peft`: LoRA adapters to and from PEFT's folders (lora/peft.py).

With `import-hf`/`export-hf` (minilm/cli/hf.py) for the model itself, a GPT-2 fine-tuned with PEFT comes into
minilm whole: import the base, import the adapter onto it, and every command that reads a minilm adapter
(compare, merge, sample) reads it. A PEFT folder carries no minilm fingerprint of its base: it is checked by
structure (names, shapes against the base, finite values) and accepted, and the command says so.
"""

from __future__ import annotations

import warnings


def add_parser(commands) -> None:
    p = commands.add_parser(
        "import-peft", help="read a PEFT LoRA adapter folder (for GPT-2) into a minilm adapter",
        description="Read PEFT_DIR (adapter_config.json + adapter_model.safetensors, as PEFT's save_pretrained "
                    "writes them for a GPT-2) onto BASE, a minilm run of the same model (e.g. written by import-hf), "
                    "and save it as a minilm adapter folder. c_attn's adapter becomes q, k and v sharing one A; "
                    "rsLoRA, rank_pattern and alpha_pattern are kept. DoRA, adapters on the embedding, trained "
                    "biases, modules_to_save and initialisations that change the base (PiSSA, OLoRA) are refused.",
        epilog="example: minilm import-hf gpt2 --out runs/gpt2; minilm import-peft my-lora --base runs/gpt2 "
               "--out runs/my-lora")
    p.add_argument("peft_dir", metavar="PEFT_DIR", help="the PEFT adapter folder")
    p.add_argument("--base", metavar="RUN", required=True, help="the minilm run of the model the adapter was trained on")
    p.add_argument("--out", metavar="ADAPTER", required=True, help="the minilm adapter folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an --out adapter an earlier command wrote")
    p.set_defaults(run=run_import)

    p = commands.add_parser(
        "export-peft", help="write a minilm LoRA adapter as a PEFT folder",
        description="Write ADAPTER (trained on BASE) as a PEFT LoRA folder that "
                    "PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(HF_BASE), PEFT_DIR) loads with the "
                    "same logits, HF_BASE being BASE exported with export-hf. Separate q, k, v adapters become one "
                    "c_attn adapter of their summed rank (a block-structured lora_B), its scale kept through "
                    "rank_pattern / alpha_pattern.",
        epilog="example: minilm export-peft runs/gpt2 runs/tuned/adapter --out my-lora")
    p.add_argument("base", metavar="BASE", help="the minilm run the adapter was trained on")
    p.add_argument("adapter", metavar="ADAPTER", help="the minilm adapter folder (OUT/adapter from finetune)")
    p.add_argument("--out", metavar="PEFT_DIR", required=True, help="the PEFT folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder an earlier export-peft wrote")
    p.set_defaults(run=run_export)


def run_import(args) -> int:
    import lora
    from lora import peft
    from minilm import checkpoint, folders
    from minilm.cli.flags import refuse_adapter

    refuse_adapter(args.base, "--base", "give the model's run (minilm import-hf HF_DIR --out RUN writes one)")
    base = checkpoint.load(args.base)
    out = folders.check_output(args.out, "adapter", overwrite=args.overwrite,
                               inputs=[args.peft_dir, args.base, base.path])
    params, cfg = peft.to_minilm(peft.read_peft(args.peft_dir), base.params)  # checked before anything is written
    lora.save_adapter(out, params, cfg, base.model_cfg, tokenizer=base.tokenizer)
    warnings.warn(peft.not_fingerprinted(args.peft_dir, args.base))
    print(f"imported {args.peft_dir} (rank {cfg.rank}, alpha {cfg.alpha:g}, targets {', '.join(cfg.targets)}) "
          f"-> {out}\n  compare with minilm compare {args.base} {out} --out REPORT")
    return 0


def run_export(args) -> int:
    import lora
    from lora import peft
    from minilm import checkpoint, folders
    from minilm.cli.flags import refuse_adapter

    refuse_adapter(args.base, "BASE", "give the model the adapter was trained on first, then the adapter")
    base = checkpoint.load(args.base)
    out = folders.check_output(args.out, "peft", overwrite=args.overwrite,
                               inputs=[args.base, base.path, args.adapter])
    params, cfg = lora.load_adapter(args.adapter, base.params, base.model_cfg, tokenizer=base.tokenizer)
    peft.save_peft(out, params, cfg, base.model_cfg)
    print(f"exported {args.adapter} -> {out}\n  load with peft: PeftModel.from_pretrained(GPT2LMHeadModel."
          f"from_pretrained(HF_BASE), '{out}'), HF_BASE written by minilm export-hf {args.base} --out HF_BASE")
    return 0
