"""Hugging Face GPT-2 folders in and out, against transformers itself (tests/hf_models.py builds the models).

Oracles: transformers' GPT2LMHeadModel logits (≤ 1e-5 absolute in float32; the models' logits are of order
ten, so that is a few float32 roundings), its tokenizers' ids, bit-exact round trips, and every refusal as
the user meets it: one line on stderr from the command, exit status 2.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_models as hm
from minilm import checkpoint, hf
from minilm.cli import main
from minilm.folders import MARK
from minilm.model import forward, init
from minilm.tokenizer import BpeTokenizer
from minilm.tree import named_leaves

TOLERANCE = 1e-5
# (activation_function, layer_norm_epsilon, n_inner): both GELU forms, GPT-2's eps and another, F = 20 and 4 D
VARIANTS = [("gelu_new", 1e-5, hm.F), ("gelu", 1e-3, None)]


def minilm_logits(cfg, params, ids):
    return np.asarray(forward(params, jnp.asarray(ids), cfg))


@pytest.fixture(scope="module")
def bpe():
    return hm.train_bpe()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, bpe):
    """Per variant, (the transformers model, its saved folder)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (activation, eps, n_inner) in enumerate(VARIANTS):
        model = hm.tiny_gpt2(seed=i, activation=activation, eps=eps, n_inner=n_inner)
        out[activation] = (model, hm.save_folder(model, root / activation, bpe=bpe))
    return out


def error_line(capsys, *argv) -> str:
    """Run the command; it must refuse with exit 2 and exactly one line on stderr. Returns that line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("activation", [v[0] for v in VARIANTS])
def test_import_gives_transformers_logits(folders, activation):
    model, folder = folders[activation]
    cfg, params, _ = hf.load(folder)
    assert (cfg.gelu, cfg.ln_eps, cfg.mlp_width) == (
        {"gelu_new": "tanh", "gelu": "erf"}[activation], model.config.layer_norm_epsilon, model.config.n_inner or 4 * hm.D)
    ids = hm.token_batch(seed=1)
    assert np.abs(minilm_logits(cfg, params, ids) - hm.logits(model, ids)).max() <= TOLERANCE


@pytest.mark.parametrize("activation", [v[0] for v in VARIANTS])
def test_export_loads_in_transformers_with_equal_logits(folders, activation, tmp_path, bpe):
    """A model minilm made (its own init, scrambled) exported, then loaded by GPT2LMHeadModel.from_pretrained."""
    from transformers import GPT2LMHeadModel

    from helpers import scrambled

    cfg, _, tokenizer = hf.load(folders[activation][1])
    # embeddings at std 0.5, as the fixture's 0.7 over its own: logits of order five, so 1e-5 is a few roundings
    params = scrambled(init(cfg, key=jax.random.key(3)), seed=3, embed_std=0.5)
    hf.save(tmp_path / "out", params, cfg, tokenizer)
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.activation_function == activation
    ids = hm.token_batch(seed=2)
    assert np.abs(minilm_logits(cfg, params, ids) - hm.logits(model, ids)).max() <= TOLERANCE


def test_import_export_import_is_bit_exact(folders, tmp_path):
    model, folder = folders["gelu"]
    cfg, params, tokenizer = hf.load(folder)
    hf.save(tmp_path / "again", params, cfg, tokenizer)
    cfg2, params2, tokenizer2 = hf.load(tmp_path / "again")
    assert (cfg2, tokenizer2) == (cfg, tokenizer)
    first, second = named_leaves(params), named_leaves(params2)
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), name
    # and the exported file holds transformers' own tensors, bit for bit (c_attn fused back as it was)
    theirs = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ours = load_file(tmp_path / "again" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("layout", [{"max_shard_size": "4KB"}, {"strip_prefix": True}, {"tokenizer_files": "vocab"}])
def test_sharded_prefixless_and_old_tokenizer_folders_read_the_same(folders, tmp_path, bpe, layout):
    model, folder = folders["gelu_new"]
    other = hm.save_folder(model, tmp_path / "other", bpe=bpe, **layout)
    if "max_shard_size" in layout:
        assert len(list(other.glob("model-*-of-*.safetensors"))) > 1
    cfg, params, tokenizer = hf.load(folder)
    cfg2, params2, tokenizer2 = hf.load(other)
    assert cfg2 == cfg and tokenizer2.vocab == tokenizer.vocab
    assert tokenizer2.encode(hm.SAMPLE_TEXT).tolist() == tokenizer.encode(hm.SAMPLE_TEXT).tolist()
    for name, x in named_leaves(params).items():
        assert np.array_equal(x, named_leaves(params2)[name]), name


# ---------------------------------------------------------------- tokenizer


def test_bpe_tokenizer_matches_transformers(folders, tmp_path, bpe):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    folder = folders["gelu_new"][1]
    theirs = GPT2TokenizerFast.from_pretrained(folder)
    _, _, tokenizer = hf.load(folder)
    from_files = BpeTokenizer.from_files(*_vocab_and_merges(tmp_path, bpe))
    texts = [hm.SAMPLE_TEXT, " justice", "Justice, justice.", "tabs\tand  spaces\n\n", "🙂<|endoftext|>The court"]
    for text in texts:
        want = theirs(text)["input_ids"]
        assert tokenizer.encode(text).tolist() == want, text
        assert from_files.encode(text).tolist() == want, text
        assert tokenizer.decode(want) == theirs.decode(want) == text
    # saved beside a checkpoint and read back: the same tokenizer
    checkpoint.write_text_atomic(tmp_path / "t.json", json.dumps(tokenizer.to_json()))
    assert BpeTokenizer.load(tmp_path / "t.json") == tokenizer
    # exported: AutoTokenizer reads the folder with the same ids
    cfg, params, _ = hf.load(folder)
    hf.save(tmp_path / "out", params, cfg, tokenizer)
    auto = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert auto(hm.SAMPLE_TEXT)["input_ids"] == tokenizer.encode(hm.SAMPLE_TEXT).tolist()


def _vocab_and_merges(tmp_path, bpe):
    folder = tmp_path / "vm"
    folder.mkdir()
    bpe.model.save(str(folder))
    (folder / "vocab.json").write_text(json.dumps(bpe.get_vocab(with_added_tokens=True)))
    return folder / "vocab.json", folder / "merges.txt"


def test_a_word_of_several_sub_tokens(bpe):
    """word_ids spells a word as it appears in running text, after a space: what the analyses look for."""
    tokenizer = BpeTokenizer.from_spec(bpe.to_str())
    for word in ("the", "justice", "insurers"):
        ids = tokenizer.word_ids(word)
        assert list(ids) == bpe.encode(" " + word).ids
    assert len(tokenizer.word_ids("insurers")) > 1  # rare in SAMPLE_TEXT: more than one piece


# ---------------------------------------------------------------- the commands


def test_import_sample_export_from_the_command_line(folders, tmp_path, capsys):
    import torch
    from transformers import GPT2LMHeadModel

    model, folder = folders["gelu"]
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    assert main(["import-hf", str(folder), "--out", str(run_dir)]) == 0
    ckpt = checkpoint.load(run_dir)
    assert isinstance(ckpt.tokenizer, BpeTokenizer)
    assert "imported" in capsys.readouterr().out
    assert main(["sample", str(run_dir), "--prompt", "The court", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    ids = hm.fast_tokenizer(hm.train_bpe())("The court")["input_ids"]
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0].tolist()
    assert text.strip() == ckpt.tokenizer.decode(greedy).strip()  # greedy: transformers' own continuation
    assert main(["export-hf", str(run_dir), "--out", str(out)]) == 0
    ids = hm.token_batch(seed=4)
    assert np.abs(hm.logits(GPT2LMHeadModel.from_pretrained(out).eval(), ids) - hm.logits(model, ids)).max() <= TOLERANCE
    assert main(["export-hf", str(run_dir), "--out", str(out), "--overwrite"]) == 0  # its own earlier export


REFUSED_CONFIGS = [
    ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True), ("tie_word_embeddings", False),
    ("scale_attn_weights", False), ("add_cross_attention", True), ("model_type", "llama"),
    ("architectures", ["GPT2ForSequenceClassification"]), ("activation_function", "relu"), ("n_ctx", 7),
    ("n_head", 5), ("layer_norm_epsilon", -1.0),
]


@pytest.mark.parametrize("key,value", REFUSED_CONFIGS)
def test_import_refuses_what_minilm_cannot_compute_naming_the_key(folders, tmp_path, capsys, key, value):
    import shutil

    folder = shutil.copytree(folders["gelu_new"][1], tmp_path / "bad")
    hm.edit_config(folder, **{key: value})
    line = error_line(capsys, "import-hf", str(folder), "--out", str(tmp_path / "run"))
    assert key in line or (key == "n_head" and "heads = 5" in line) or (key == "layer_norm_epsilon" and "ln_eps" in line), line
    assert not (tmp_path / "run").exists()


def _broken(name):
    """Ways a folder can be wrong, each a function(folder) that breaks a copy of a good one."""
    def pickle_only(f):
        for p in f.glob("*.safetensors"):
            p.unlink()
        (f / "pytorch_model.bin").write_bytes(b"not read")

    def tensor(f, change):
        arrays = load_file(f / "model.safetensors")
        change(arrays)
        save_file(arrays, f / "model.safetensors", metadata={"format": "pt"})

    def nan(a):
        a["transformer.h.1.mlp.c_fc.weight"][0, 0] = np.nan

    def shape(a):
        a["transformer.h.0.attn.c_proj.weight"] = np.zeros((hm.D, hm.D + 1), np.float32)

    def untied(a):
        a["lm_head.weight"] = a["transformer.wte.weight"] + 1

    def missing(a):
        del a["transformer.ln_f.bias"]

    return {"pytorch_model.bin only": (pickle_only, "save_pretrained"),
            "no config.json": (lambda f: (f / "config.json").unlink(), "config.json"),
            "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json",)], "tokenizer"),
            "not finite": (lambda f: tensor(f, nan), "nan"),
            "wrong shape": (lambda f: tensor(f, shape), "c_proj" if False else "attn.o.w"),
            "missing tensor": (lambda f: tensor(f, missing), "ln_f.bias"),
            "untied head": (lambda f: tensor(f, untied), "lm_head.weight"),
            "vocabulary size": (lambda f: hm.edit_config(f, vocab_size=hm.V + 1), "vocab_size"),
            "not a folder": (lambda f: None, "not a folder")}[name]


@pytest.mark.parametrize("case", ["pytorch_model.bin only", "no config.json", "no tokenizer", "not finite",
                                  "wrong shape", "missing tensor", "untied head", "vocabulary size", "not a folder"])
def test_import_refuses_a_broken_folder_in_one_line(folders, tmp_path, capsys, case):
    import shutil

    folder = shutil.copytree(folders["gelu_new"][1], tmp_path / "bad")
    breaks, expected = _broken(case)
    breaks(folder)
    given = tmp_path / "bad" / "config.json" if case == "not a folder" else folder
    line = error_line(capsys, "import-hf", str(given), "--out", str(tmp_path / "run"))
    assert expected in line, line
    assert not (tmp_path / "run").exists()


def _word_model_run(tmp_path, mlp: bool, kind: str = "word"):
    """A minilm run folder with minilm's own word or char vocabulary (scrambled weights), as `train` leaves one."""
    from minilm.config import DataConfig, ModelConfig, TrainConfig
    from minilm.tokenizer import Tokenizer

    from helpers import scrambled

    words = (Tokenizer("word", ("\n", "court", "judge", "the", "spoke", "justice", "of")) if kind == "word" else
             Tokenizer.build("char", "the judge spoke\nof justice, the court"))
    cfg = ModelConfig(vocab_size=words.size, context=5, width=6, layers=1, heads=2, mlp=mlp, mlp_ratio=3)
    run_dir = tmp_path / f"{kind}{mlp}"
    checkpoint.save(run_dir / "checkpoint", params=scrambled(init(cfg, key=jax.random.key(0)), seed=5), opt_state={},
                    model_cfg=cfg, train_cfg=TrainConfig(), data_cfg=DataConfig(), tokenizer=words,
                    state={"step": 0, "data_cursor": 0, "key": checkpoint.key_to_json(jax.random.key(0))})
    return run_dir, cfg, words


@pytest.mark.parametrize("kind", ["word", "char"])
def test_a_minilm_model_exports_with_its_own_vocabulary(tmp_path, capsys, kind):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    run_dir, cfg, words = _word_model_run(tmp_path, mlp=True, kind=kind)
    assert main(["export-hf", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    text = "the judge spoke\nof justice  the court"
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"]
    assert ids == words.encode(text).tolist()
    if kind == "char":  # characters join back with nothing between them
        assert AutoTokenizer.from_pretrained(tmp_path / "hf").decode(ids) == text
    batch = np.array([ids[:5], ids[-5:]])
    params = checkpoint.load(run_dir).params
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(minilm_logits(cfg, params, batch) - hm.logits(model, batch)).max() <= TOLERANCE


def test_export_refuses_what_transformers_cannot_read(tmp_path, capsys, folders):
    run_dir, _, _ = _word_model_run(tmp_path, mlp=False)
    line = error_line(capsys, "export-hf", str(run_dir), "--out", str(tmp_path / "hf"))
    assert "attention-only" in line, line
    assert not (tmp_path / "hf").exists()
    # an --out minilm did not write is never replaced
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert main(["import-hf", str(folders["gelu_new"][1]), "--out", str(tmp_path / "imported")]) == 0
    line = error_line(capsys, "export-hf", str(tmp_path / "imported"), "--out", str(theirs), "--overwrite")
    assert "not written by minilm" in line and (theirs / "notes.txt").read_text() == "mine"
    assert not (theirs / MARK).exists()


def test_a_word_of_several_sub_tokens_has_one_vector(bpe):
    """In context, the state at its last sub-token, averaged over its whole occurrences; static, the mean row."""
    from minilm.analysis.compare import static_vectors, word_vectors

    tokenizer = BpeTokenizer.from_spec(bpe.to_str())
    span = tokenizer.word_ids("insurers")
    windows = tokenizer.encode("the insurers said the insurs insurers pay")[None]  # (1, T); one near miss
    states = np.random.default_rng(0).normal(size=(3, *windows.shape, 5))  # (L+1, B, T, D)
    ends = [t for t in range(len(span) - 1, windows.shape[1])
            if tuple(windows[0, t - len(span) + 1: t + 1]) == span]
    assert len(ends) == 2
    np.testing.assert_array_equal(word_vectors(states, windows, [span])[:, 0], states[:, 0, ends].mean(axis=1))
    table = np.random.default_rng(1).normal(size=(hm.V, 5))
    np.testing.assert_array_equal(static_vectors(table, [span, span[:1]]),
                                  np.stack([table[list(span)].mean(axis=0), table[span[0]]]))


def test_compare_reads_words_of_an_imported_model(folders, tmp_path, bpe):
    """`minilm compare --words --probe` on two imported GPT-2s of one shape (the second another seed)."""
    base_run, tuned_run = tmp_path / "base", tmp_path / "tuned"
    other = hm.save_folder(hm.tiny_gpt2(seed=7), tmp_path / "other", bpe=bpe)
    assert main(["import-hf", str(folders["gelu_new"][1]), "--out", str(base_run)]) == 0
    assert main(["import-hf", str(other), "--out", str(tuned_run)]) == 0
    assert main(["compare", str(base_run), str(tuned_run), "--words", "justice,insurers,court", "--probe",
                 "The court heard the insurers", "--no-corpus-probe", "--out", str(tmp_path / "report")]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["probe"]["words"] == ["justice", "insurers", "court"]
