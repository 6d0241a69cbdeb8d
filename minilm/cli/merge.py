"""`minilm merge`: fold LoRA adapters into their base model's weights and save a plain checkpoint.

Each adapter adds weight_i · s·A B to the matrices it adapts (lora/merge.py), so the merged model
computes what the base with the adapters applied computes, and `minilm sample` reads it as any other.
"""

from __future__ import annotations

import math

from minilm.errors import MinilmError


def add_parser(commands) -> None:
    p = commands.add_parser("merge", help="merge LoRA adapters into a full checkpoint",
                            description="Fold one or more adapters into BASE's weights (W + sum of weight * s*A*B) "
                                        "and save a plain checkpoint that `minilm sample` reads.")
    p.add_argument("base", metavar="BASE", help="the base model the adapters were trained on")
    p.add_argument("adapters", metavar="ADAPTER", nargs="+", help="adapter folders (OUT/adapter from finetune)")
    p.add_argument("--weights", metavar="W1,W2,...", help="one factor per adapter for a linear combination (default 1)")
    p.add_argument("--out", metavar="DIR", required=True, help="where to write the merged checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder an earlier merge wrote")
    p.add_argument("--allow-other-base", action="store_true",
                   help="apply adapters trained on another base of the same shape (their fingerprint differs)")
    p.set_defaults(run=run)


def floats(text: str, flag: str) -> list[float]:
    """'0.5,0.5' -> [0.5, 0.5], or an error that shows the flag's syntax; nan and inf are refused."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise MinilmError(f"{flag} {text!r}: expected comma-separated numbers, e.g. {flag} 0.5,0.5") from None
    if not all(math.isfinite(v) for v in values):
        raise MinilmError(f"{flag} {text!r}: expected finite numbers, e.g. {flag} 0.5,0.5")
    return values


def run(args) -> int:
    import lora
    from minilm import checkpoint, folders
    from minilm.cli.flags import refuse_adapter

    refuse_adapter(args.base, "BASE", "give the model the adapters were trained on first, then the adapters")
    base = checkpoint.load(args.base)
    weights = [1.0] * len(args.adapters) if args.weights is None else floats(args.weights, "--weights")
    if len(weights) != len(args.adapters):
        raise MinilmError(f"--weights has {len(weights)} values for {len(args.adapters)} adapters; give one each")
    out = folders.check_output(args.out, "checkpoint", overwrite=args.overwrite,
                               inputs=[args.base, base.path, *args.adapters])
    params, names = base.params, {}
    for i, path in enumerate(args.adapters):
        params, cfg = lora.load_adapter(path, params, base.model_cfg, name=f"adapter{i}", tokenizer=base.tokenizer,
                                        allow_other_base=args.allow_other_base)
        names[cfg.name] = weights[i]
    merged = lora.merge(params, names)
    checkpoint.save(out, params=merged, opt_state={}, model_cfg=base.model_cfg, train_cfg=base.train_cfg,
                    data_cfg=base.data_cfg, tokenizer=base.tokenizer,
                    state={"merged_from": str(base.path), "adapters": list(map(str, args.adapters)),
                           "weights": weights})
    print(f"merged {len(args.adapters)} adapter(s) into {args.base} -> {out}\n"
          f"  sample with minilm sample {out} --prompt '...'")
    return 0
