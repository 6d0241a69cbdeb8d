"""Logits parity with transformers and peft, as figures: `python benchmarks/interop_parity.py` (needs the test
extra: pip install -e '.[test]'). The tests (tests/test_hf.py, tests/test_peft.py) assert these stay <= 1e-5;
this prints the measured max |logits difference| for import, export and PEFT adapters both ways, on the tests'
tiny random GPT-2 (weights of order one)."""
import sys, tempfile, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))
import numpy as np, jax, jax.numpy as jnp, torch
import hf_models as hm
from minilm import hf
from minilm.model import forward
from lora import peft as lp
from transformers import GPT2LMHeadModel
from peft import LoraConfig, get_peft_model, PeftModel
tmp = Path(tempfile.mkdtemp()); ids = hm.token_batch(seed=3)
def ours(cfg, params): return np.asarray(forward(params, jnp.asarray(ids), cfg))
for act in ("gelu_new", "gelu"):
    m = hm.tiny_gpt2(seed=1, activation=act, eps=1e-4)
    d = hm.save_folder(m, tmp / act)
    cfg, params, tok = hf.load(d)
    imp = np.abs(ours(cfg, params) - hm.logits(m, ids)).max()
    hf.save(tmp / (act + "_out"), params, cfg, tok)
    back = GPT2LMHeadModel.from_pretrained(tmp / (act + "_out")).eval()
    exp = np.abs(hm.logits(back, ids) - ours(cfg, params)).max()
    print(f"{act}, eps 1e-4, n_inner 20: import {imp:.1e}, export {exp:.1e}")
for case, extra in {"all linear r3": {}, "rsLoRA": {"use_rslora": True},
                    "rank/alpha patterns": {"rank_pattern": {"h.1.mlp.c_fc": 5}, "alpha_pattern": {"c_proj": 7}}}.items():
    base = hm.save_folder(hm.tiny_gpt2(seed=1), tmp / ("b" + case))
    pm = get_peft_model(hm.tiny_gpt2(seed=1), LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn","c_proj","c_fc"], fan_in_fan_out=True, **extra))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n: p.copy_(torch.randn(p.shape, generator=g) / 3)
    pm.eval().save_pretrained(tmp / case)
    want = hm.logits(pm, ids)
    cfg, params, _ = hf.load(base)
    p2, lc = lp.to_minilm(lp.read_peft(tmp / case), params)
    a = np.abs(ours(cfg, p2) - want).max()
    lp.save_peft(tmp / (case + "o"), p2, lc, cfg)
    again = PeftModel.from_pretrained(hm.tiny_gpt2(seed=1), tmp / (case + "o")).eval()
    b = np.abs(hm.logits(again, ids) - ours(cfg, p2)).max()
    print(f"PEFT {case}: PEFT->minilm {a:.1e}, minilm->PEFT {b:.1e}")
