"""PEFT adapter folders in and out (lora/peft.py), against peft itself.

Each case builds a tiny random GPT-2 with transformers (tests/hf_models.py), wraps it in a PEFT LoRA whose
lora_B is drawn at random (PEFT starts B at zero, which would make every parity test pass trivially), and
compares logits: PeftModel's against minilm's with the converted adapter, and back again. Tolerance 1e-5
absolute in float32, as for the model (tests/test_hf.py): the two libraries add the same terms in other
orders.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import hf_models as hm
from lora import peft as lpeft
from minilm import hf
from minilm.errors import MinilmError
from minilm.model import forward

TOLERANCE = 1e-5
IDS = hm.token_batch(seed=3)


def peft_folder(tmp_path, name, **lora):
    """A PEFT LoRA on a tiny GPT-2, B random, saved with save_pretrained; and the base model's own folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    base_dir = hm.save_folder(hm.tiny_gpt2(seed=1), tmp_path / "base")
    settings = {"r": 3, "lora_alpha": 5, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True,
                "lora_dropout": 0.0, **lora}
    model = get_peft_model(hm.tiny_gpt2(seed=1), LoraConfig(**settings))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=generator) / 3)
    model.eval().save_pretrained(tmp_path / name)
    return tmp_path / name, base_dir, hm.logits(model, IDS)


def minilm_logits(base_dir, folder):
    cfg, params, _ = hf.load(base_dir)
    params, lora_cfg = lpeft.to_minilm(lpeft.read_peft(folder), params)
    return cfg, params, lora_cfg, np.asarray(forward(params, jnp.asarray(IDS), cfg))


CASES = {"all linear": {},
         "rsLoRA": {"use_rslora": True},
         "per-layer ranks": {"rank_pattern": {"h.1.mlp.c_fc": 5, "h.0.attn.c_attn": 2}, "alpha_pattern": {"c_proj": 7}},
         "attention only": {"target_modules": ["c_attn"], "r": 4}}


@pytest.mark.parametrize("case", list(CASES))
def test_a_peft_adapter_has_peft_logits_in_minilm_and_back(tmp_path, case):
    from peft import PeftModel

    folder, base_dir, expected = peft_folder(tmp_path, "adapter", **CASES[case])
    cfg, params, lora_cfg, ours = minilm_logits(base_dir, folder)
    assert np.abs(ours - expected).max() <= TOLERANCE
    # and written back: PEFT loads minilm's folder with the same logits, and every array is bit-exact
    lpeft.save_peft(tmp_path / "again", params, lora_cfg, cfg)
    again = PeftModel.from_pretrained(hm.tiny_gpt2(seed=1), tmp_path / "again").eval()
    assert np.abs(hm.logits(again, IDS) - expected).max() <= TOLERANCE
    original, written = load_file(folder / lpeft.ARRAYS), load_file(tmp_path / "again" / lpeft.ARRAYS)
    assert sorted(original) == sorted(written)
    for name in original:
        np.testing.assert_array_equal(original[name], written[name], err_msg=name)


def test_separate_q_and_v_adapters_become_one_block_structured_c_attn(tmp_path):
    """minilm's own q-and-v adapter (rank 3 each, not fused) -> one c_attn adapter of rank 6 that PEFT runs."""
    import jax
    from peft import PeftModel

    from lora.attach import attach
    from lora.config import LoraConfig
    from lora.train import split
    from minilm.tree import combine

    base_dir = hm.save_folder(hm.tiny_gpt2(seed=1), tmp_path / "base")
    cfg, params, _ = hf.load(base_dir)
    lora_cfg = LoraConfig(rank=3, alpha=4.0, targets=("attn.q", "attn.v"))
    trainable, frozen = split(attach(params, lora_cfg, key=jax.random.key(0)), lora_cfg)
    rng = np.random.default_rng(5)  # B starts at zero: draw every adapter array, so the adapters count
    params = combine(jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) / 3, jnp.float32), trainable), frozen)
    ours = np.asarray(forward(params, jnp.asarray(IDS), cfg))
    lpeft.save_peft(tmp_path / "out", params, lora_cfg, cfg)
    written = json.loads((tmp_path / "out" / lpeft.CONFIG).read_text())
    assert written["target_modules"] == ["attn.c_attn"] and set(written["rank_pattern"].values()) == {6}
    theirs = PeftModel.from_pretrained(hm.tiny_gpt2(seed=1), tmp_path / "out").eval()
    assert np.abs(hm.logits(theirs, IDS) - ours).max() <= TOLERANCE


@pytest.mark.parametrize("key, value, message", [
    ("use_dora", True, "DoRA"),
    ("bias", "lora_only", "trained biases"),
    ("modules_to_save", ["lm_head"], "fully trained modules"),
    ("init_lora_weights", "pissa", "residual base"),
    ("peft_type", "IA3", "only LoRA adapters"),
])
def test_what_does_not_map_is_refused_naming_the_key(tmp_path, key, value, message):
    folder, _, _ = peft_folder(tmp_path, "adapter")
    config = json.loads((folder / lpeft.CONFIG).read_text())
    config[key] = value
    (folder / lpeft.CONFIG).write_text(json.dumps(config))
    with pytest.raises(MinilmError, match=message) as e:
        lpeft.read_peft(folder)
    assert key in str(e.value)


def test_an_adapter_on_the_embedding_is_refused(tmp_path):
    folder, _, _ = peft_folder(tmp_path, "adapter", target_modules=["c_attn", "wte"])
    with pytest.raises(MinilmError, match="tied token embedding"):
        lpeft.read_peft(folder)


def test_an_adapter_for_another_shape_is_refused(tmp_path):
    folder, _, _ = peft_folder(tmp_path, "adapter")
    other = hm.save_folder(hm.tiny_gpt2(seed=1, n_inner=24), tmp_path / "other")
    _, params, _ = hf.load(other)
    with pytest.raises(MinilmError, match="another shape"):
        lpeft.to_minilm(lpeft.read_peft(folder), params)


def test_a_peft_fine_tune_through_the_command_line(tmp_path, capsys):
    """A user's GPT-2 and PEFT adapter: import-hf, import-peft, compare (the whole report), export-peft back."""
    from peft import PeftModel

    from minilm.cli import main

    folder, base_dir, expected = peft_folder(tmp_path, "adapter", use_rslora=True)
    assert main(["import-hf", str(base_dir), "--out", str(tmp_path / "run")]) == 0
    assert main(["import-peft", str(folder), "--base", str(tmp_path / "run"), "--out", str(tmp_path / "ours")]) == 0
    assert "checked by structure only" in capsys.readouterr().err  # no fingerprint: the user is told
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "ours"), "--out", str(tmp_path / "report"),
                 "--probe", "The court heard the case of the painting", "--words", "court,judge,case,painting"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics and (tmp_path / "report" / "report.html").is_file()
    assert main(["export-peft", str(tmp_path / "run"), str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    back = PeftModel.from_pretrained(hm.tiny_gpt2(seed=1), tmp_path / "back").eval()
    assert np.abs(hm.logits(back, IDS) - expected).max() <= TOLERANCE


def test_the_command_line_refuses_a_dora_folder_in_one_line(tmp_path, capsys):
    from minilm.cli import main

    folder, base_dir, _ = peft_folder(tmp_path, "adapter")
    assert main(["import-hf", str(base_dir), "--out", str(tmp_path / "run")]) == 0
    config = json.loads((folder / lpeft.CONFIG).read_text())
    (folder / lpeft.CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    capsys.readouterr()
    assert main(["import-peft", str(folder), "--base", str(tmp_path / "run"), "--out", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minilm import-peft: error: ") and "use_dora" in err, err
    assert not (tmp_path / "ours").exists()


def test_compare_without_words_on_an_imported_model_says_to_pass_them(tmp_path, capsys):
    from minilm.cli import main

    base_dir = hm.save_folder(hm.tiny_gpt2(seed=1), tmp_path / "hf")
    assert main(["import-hf", str(base_dir), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "run"), "--out", str(tmp_path / "report"),
                 "--probe", "The court heard the case"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --words" in err, err


def test_compare_reads_a_hugging_face_folder_and_a_peft_folder_directly(tmp_path, capsys):
    """A user's folders as they are: BASE a Hugging Face GPT-2 folder, TUNED a PEFT adapter folder and a fully
    fine-tuned Hugging Face folder, converted on the fly; the adapter's weight change is exactly s·A·B."""
    from minilm.cli import main

    folder, base_dir, _ = peft_folder(tmp_path, "my-lora")
    full_dir = hm.save_folder(hm.tiny_gpt2(seed=2), tmp_path / "full")
    assert main(["compare", str(base_dir), str(folder), str(full_dir), "--out", str(tmp_path / "report"),
                 "--words", "court,judge,case,painting", "--probe", "The court heard the case"]) == 0
    assert "checked by structure only" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["models"] == ["my-lora", "full"]
    # the same report as through import-hf and import-peft
    assert main(["import-hf", str(base_dir), "--out", str(tmp_path / "run")]) == 0
    assert main(["import-peft", str(folder), "--base", str(tmp_path / "run"), "--out", str(tmp_path / "ours")]) == 0
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "ours"), str(full_dir), "--out",
                 str(tmp_path / "again"), "--words", "court,judge,case,painting",
                 "--probe", "The court heard the case"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for ours, theirs in (("ours", "my-lora"), ("full", "full")):
        assert json.dumps(again["weights"][ours], sort_keys=True) == json.dumps(metrics["weights"][theirs],
                                                                                 sort_keys=True)


def test_compares_report_leads_with_the_map_of_the_words_moving(tmp_path):
    """The map in compare's report: base at step 0, each tuned model at step 1, the words that occur in the probe
    text; its base coordinates are the same for every variant, and a tuned model equal to the base does not move."""
    from minilm.cli import main
    from minilm.report_map import read_data

    folder, base_dir, _ = peft_folder(tmp_path, "my-lora")
    assert main(["compare", str(base_dir), str(folder), str(base_dir), "--out", str(tmp_path / "report"),
                 "--words", "court,judge,case,painting,nowhere", "--probe",
                 "The court heard the case of the stolen painting; the judge spoke"]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    data = read_data(page)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert data == json.loads(json.dumps(metrics["map"]))  # the page draws what metrics.json holds
    assert data["variants"] == ["my-lora", "base'"] and data["steps"] == [0, 1]
    # words read in the probe's windows only (context 13 here): "nowhere" never occurs, so it is not placed
    assert "nowhere" not in data["words"] and len(data["words"]) >= 2
    assert set(data["words"]) <= {"court", "judge", "case", "painting"}
    for level in data["levels"]:
        same = np.asarray(data["xy"][level]["base'"])  # (steps, M, 2): the base itself does not move
        np.testing.assert_allclose(same[1], same[0], atol=1e-5)
        moved = np.asarray(data["xy"][level]["my-lora"])
        np.testing.assert_array_equal(moved[0], same[0])
