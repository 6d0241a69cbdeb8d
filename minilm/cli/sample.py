"""`minilm sample`: continue a prompt with a trained model, optionally with a LoRA adapter on top.

Every SampleConfig field is a flag (flags.py). Generation reuses earlier positions' keys and values
(the KV cache) unless --no-kv-cache asks to recompute them at every step.
"""

from __future__ import annotations

import json
import sys
import time

from minilm.cli.flags import add_config_flags, given, refuse_adapter
from minilm.config import SampleConfig, to_dict


def add_parser(commands) -> None:
    p = commands.add_parser("sample", help="generate text from a checkpoint",
                            description="Continue a prompt with a trained model, using a key/value cache.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run folder (from train --out) or its checkpoint/")
    p.add_argument("--prompt", help="text to continue, in the model's vocabulary (default: a newline)")
    p.add_argument("--adapter", metavar="DIR", help="apply a LoRA adapter (from finetune --lora) to the model")
    p.add_argument("--allow-other-base", action="store_true",
                   help="apply an --adapter trained on another base of the same shape (its fingerprint differs)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every flag and file, print the resolved sampling config as JSON, sample nothing")
    add_config_flags(p, SampleConfig, "sampling")
    p.set_defaults(run=run)


def run(args) -> int:
    import jax
    import numpy as np

    import lora
    from minilm import checkpoint
    from minilm.cli.fit import refuse_beyond_memory
    from minilm.generate import check_length, generate

    refuse_adapter(args.checkpoint, "CHECKPOINT", "give the model it was trained on, and the adapter with --adapter")
    ckpt = checkpoint.load(args.checkpoint)
    cfg = SampleConfig(**given(args, SampleConfig))
    params = ckpt.params
    if args.adapter is not None:
        params, _ = lora.load_adapter(args.adapter, params, ckpt.model_cfg, tokenizer=ckpt.tokenizer,
                                      allow_other_base=args.allow_other_base)
    prompt = args.prompt if args.prompt is not None else "\n"
    ids = ckpt.tokenizer.encode(prompt)
    check_length(ckpt.model_cfg, len(ids), cfg.max_new_tokens)
    m, context = ckpt.model_cfg, ckpt.model_cfg.context  # the key/value cache and one row of logits per sample, float32
    cache_bytes = 4 * cfg.num_samples * (2 * m.layers * context * m.width + 4 * context * m.width + m.vocab_size)
    refuse_beyond_memory(cache_bytes, f"--num-samples {cfg.num_samples} needs about {{gib}} GiB for its "
                                      "key/value caches", "draw fewer samples at once")
    if args.dry_run:  # every input is checked
        print(json.dumps({"checkpoint": str(ckpt.path), "prompt_tokens": len(ids), "sample": to_dict(cfg)}))
        return 0
    batch = np.tile(ids, (cfg.num_samples, 1))  # (num_samples, P)
    started = time.perf_counter()
    tokens = generate(params, batch, ckpt.model_cfg, key=jax.random.key(cfg.seed),
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                      top_p=cfg.top_p, use_cache=cfg.kv_cache)
    tokens = np.asarray(tokens)
    elapsed = time.perf_counter() - started
    for i, row in enumerate(tokens):
        if i:
            print("-" * 40)
        print(ckpt.tokenizer.decode(row))
    print(f"[{cfg.num_samples} x {cfg.max_new_tokens} tokens in {elapsed:.2f} s, compile included; "
          f"kv cache {'on' if cfg.kv_cache else 'off'}]", file=sys.stderr)
    return 0
