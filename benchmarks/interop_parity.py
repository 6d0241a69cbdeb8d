"""Logits parity with transformers and peft, as figures: `python benchmarks/interop_parity.py`.

Needs the test extra (pip install -e '.[test]'). The tests (tests/test_hf.py, tests/test_peft.py) assert that
these stay <= 1e-5; this prints the measured max |logits difference| for import, export, and PEFT adapters
both ways, on the tests' tiny random GPT-2 (weights of order one, tests/hf_models.py).
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import hf_models as hm  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

from lora import peft as lpeft  # noqa: E402
from minilm import hf  # noqa: E402
from minilm.model import forward  # noqa: E402

IDS = hm.token_batch(seed=3)


def ours(cfg, params) -> np.ndarray:
    return np.asarray(forward(params, jnp.asarray(IDS), cfg))


def model_parity(tmp: Path) -> None:
    for activation in ("gelu_new", "gelu"):
        model = hm.tiny_gpt2(seed=1, activation=activation, eps=1e-4)
        cfg, params, tokenizer = hf.load(hm.save_folder(model, tmp / activation))
        imported = np.abs(ours(cfg, params) - hm.logits(model, IDS)).max()
        hf.save(tmp / f"{activation}-out", params, cfg, tokenizer)
        back = GPT2LMHeadModel.from_pretrained(tmp / f"{activation}-out").eval()
        exported = np.abs(hm.logits(back, IDS) - ours(cfg, params)).max()
        print(f"{activation}, eps 1e-4, n_inner {hm.F}: import {imported:.1e}, export {exported:.1e}")


def adapter_parity(tmp: Path) -> None:
    cases = {"all linear r3": {}, "rsLoRA": {"use_rslora": True},
             "rank/alpha patterns": {"rank_pattern": {"h.1.mlp.c_fc": 5}, "alpha_pattern": {"c_proj": 7}}}
    for i, (case, extra) in enumerate(cases.items()):
        base = hm.save_folder(hm.tiny_gpt2(seed=1), tmp / f"base{i}")
        tuned = get_peft_model(hm.tiny_gpt2(seed=1), LoraConfig(r=3, lora_alpha=5, fan_in_fan_out=True,
                                                                 target_modules=["c_attn", "c_proj", "c_fc"], **extra))
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():  # PEFT starts B at zero: draw it, so the adapter counts
            for name, p in tuned.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) / 3)
        tuned.eval().save_pretrained(tmp / f"peft{i}")
        cfg, params, _ = hf.load(base)
        params, lora_cfg = lpeft.to_minilm(lpeft.read_peft(tmp / f"peft{i}"), params)
        into = np.abs(ours(cfg, params) - hm.logits(tuned, IDS)).max()
        lpeft.save_peft(tmp / f"out{i}", params, lora_cfg, cfg)
        again = PeftModel.from_pretrained(hm.tiny_gpt2(seed=1), tmp / f"out{i}").eval()
        out = np.abs(hm.logits(again, IDS) - ours(cfg, params)).max()
        print(f"PEFT {case}: PEFT -> minilm {into:.1e}, minilm -> PEFT {out:.1e}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        model_parity(Path(tmp))
        adapter_parity(Path(tmp))
