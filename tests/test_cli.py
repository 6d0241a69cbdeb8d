"""The `minilm` command as a user meets it: flags from the configs, files on disk, resume, clear errors."""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import re
import time
import typing

import pytest

from lora import LoraConfig, parse_spec
from minilm.cli import bench, build_parser, main
from minilm.cli.flags import add_config_flags, describe_keys, given
from minilm.config import DTYPES, DataConfig, ModelConfig, SampleConfig, TrainConfig, option, preset
from minilm.errors import MinilmError
from minilm.folders import MARK

# A model small enough that a CLI run costs little more than its compilation.
SMALL = ["--corpus", "arithmetic", "--corpus-size", "300", "--context", "16", "--width", "16", "--layers", "1",
         "--heads", "2", "--batch-size", "4", "--eval-batches", "2"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def flags(cls):
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def test_every_config_field_is_a_documented_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in flags(ModelConfig) + flags(TrainConfig) + flags(DataConfig) + ["--preset", "--out", "--resume"]:
        assert flag in text, flag
    assert "--vocab-size" not in text  # set from the tokenizer, not by hand
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    for flag in flags(SampleConfig) + ["--prompt"]:
        assert flag in text, flag


def help_text(capsys, monkeypatch, command) -> str:
    """`minilm COMMAND --help`, one line per flag (wide enough that argparse breaks no help text)."""
    monkeypatch.setenv("COLUMNS", "100000")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_lora_field_is_a_documented_lora_key(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, "finetune")
    lora_help = next(line for line in text.splitlines() if line.lstrip().startswith("--lora"))
    for f in dataclasses.fields(LoraConfig):
        assert f"{f.name}: {f.metadata['help']}" in lora_help, f.name


def spec_text(value) -> str:
    """A LoraConfig value as --lora writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return str(value)


def test_lora_spec_reads_every_field_as_its_type():
    cfg = LoraConfig(rank=3, alpha=6.0, use_rslora=True, dropout=0.25, targets=("attn.q", "mlp.*"),
                     rank_pattern={"mlp.*": 2, "attn.q": 5}, alpha_pattern={"mlp.*": 1.5}, layers=(0, 2),
                     init="gaussian", bias="all", modules_to_save=("ln_f", "blocks.*.ln1"), name="style")
    fields = [f for f in dataclasses.fields(LoraConfig) if getattr(cfg, f.name) is not None]  # None: not spellable
    parsed = parse_spec(",".join(f"{f.name}={spec_text(getattr(cfg, f.name))}" for f in fields))
    assert parsed == cfg
    for f in fields:  # the same type, not only an equal value: alpha=6 is the float 6.0
        value, want = getattr(parsed, f.name), getattr(cfg, f.name)
        assert type(value) is type(want), f.name
        if isinstance(value, (tuple, dict)):
            assert [type(v) for v in (value.values() if isinstance(value, dict) else value)] == \
                   [type(v) for v in (want.values() if isinstance(want, dict) else want)], f.name
    assert parse_spec("use_dora=yes,fuse_qkv=0") == LoraConfig(use_dora=True, fuse_qkv=False)


@pytest.mark.parametrize("spec, message", [
    ("rank=2.5", "rank='2.5'; expected an integer"),
    ("dropout=half", "dropout='half'; expected a number"),
    ("layers=0,one", "layers='one'; expected an integer"),
    ("alpha_pattern=attn.q:big", "alpha_pattern[attn.q]='big'; expected a number"),
    ("use_rslora=on", "use_rslora='on'; expected true or false"),
    ("targets=attn.q,attn.v,rank_pattern=attn.q:2,3", "rank_pattern entries are pattern:value"),
])
def test_lora_spec_values_of_the_wrong_type(spec, message):
    with pytest.raises(MinilmError, match="^--lora: " + re.escape(message)):
        parse_spec(spec)


def changed_value(cls, name: str, value):
    """A valid value of field `name` other than `value`: another choice, or twice the number."""
    choices = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("choices")
    if choices:
        return next(v for v in choices if v != value)
    assert typing.get_type_hints(cls)[name] in (int, "int"), name
    return 2 * value


@pytest.mark.parametrize("cls, names", [(ModelConfig, bench.MODEL_SIZES), (TrainConfig, bench.TRAIN_SIZES)])
def test_bench_size_flags_are_the_config_fields(cls, names, capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, "bench")
    index = 0 if cls is ModelConfig else 1
    parser = build_parser()
    for name in names:
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        flag = "--" + name.replace("_", "-")
        assert re.search(rf"^ +{flag}( \S+)?\s+{re.escape(f.metadata['help'])} \(", text, re.M), flag
        preset_value = getattr(bench.configs(parser.parse_args(["bench", "--preset", "tiny"]))[index], name)
        value = changed_value(cls, name, preset_value)
        args = parser.parse_args(["bench", "--preset", "tiny", flag, str(value)])
        assert getattr(bench.configs(args)[index], name) == value, name
    unchanged = bench.configs(parser.parse_args(["bench"]))  # no size flag: the preset's sizes, 65 tokens
    assert unchanged == (dataclasses.replace(preset("small")[0], vocab_size=65), preset("small")[1])
    assert "--dtype {" + ",".join(DTYPES) + "}" in text


def test_a_new_config_field_is_a_new_flag_and_a_new_lora_key():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extended(TrainConfig):
        label_smoothing: float = option(0.0, "probability spread evenly over the vocabulary")

    parser = argparse.ArgumentParser()
    add_config_flags(parser, Extended, "training")
    assert "--label-smoothing FLOAT" in parser.format_help()
    assert given(parser.parse_args(["--label-smoothing", "0.1", "--steps", "7"]), Extended) == {
        "label_smoothing": 0.1, "steps": 7}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ExtendedLora(LoraConfig):
        weight_decay: float = option(0.0, "decay of A and B")

    assert describe_keys(ExtendedLora).endswith("; weight_decay: decay of A and B")


def test_train_dtype_takes_the_config_choices(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--corpus", "arithmetic", "--dtype", "float16", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype: invalid choice: 'float16'" in err and all(repr(d) in err for d in DTYPES)
    assert not (tmp_path / "x").exists()


def test_train_then_sample_then_resume(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", *SMALL, "--steps", "6", "--eval-every", "3", "--checkpoint-every", "4",
                          "--out", str(out))
    assert code == 0
    assert str(out / "checkpoint") in stdout
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        MARK, "config.json", "model.safetensors", "optimizer.safetensors", "state.json", "tokenizer.json"]
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert ["eval_loss" in m for m in lines] == [False, False, True, False, False, True]

    code, stdout, _ = run(capsys, "sample", str(out), "--prompt", "12+", "--max-new-tokens", "5",
                          "--temperature", "0")
    assert code == 0 and stdout.startswith("12+") and len(stdout) == len("12+") + 5 + 1  # + print's newline

    code, _, err = run(capsys, "train", *SMALL, "--steps", "6", "--out", str(out))
    assert code == 2 and "already holds a training run" in err
    code, _, err = run(capsys, "train", "--out", str(out), "--resume", "--width", "32")
    assert code == 2 and "--width 32 (checkpoint: 16)" in err
    code, _, _ = run(capsys, "train", "--out", str(out), "--resume", "--steps", "8")
    assert code == 0
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))


def test_ctrl_c_saves_and_resume_is_bit_identical(capsys, tmp_path):
    args = [*SMALL, "--steps", "600", "--eval-every", "50", "--checkpoint-every", "1000"]
    assert main(["train", *args, "--out", str(tmp_path / "whole")]) == 0

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "minilm.cli", "train", *args, "--out", str(interrupted)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        path = interrupted / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: saved step" in err and "Traceback" not in err
    stopped_at = json.loads((interrupted / "checkpoint" / "state.json").read_text())["step"]
    assert 10 <= stopped_at < 600

    with (interrupted / "metrics.jsonl").open("a") as log:
        log.write('{"step": 99')  # a line cut short by a kill mid-write
    assert main(["train", "--out", str(interrupted), "--resume"]) == 0
    capsys.readouterr()
    keys = ("step", "loss", "grad_norm", "lr", "eval_loss")
    whole = [{k: m.get(k) for k in keys} for m in metrics(tmp_path / "whole")]
    resumed = [{k: m.get(k) for k in keys} for m in metrics(interrupted)]
    assert resumed == whole


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["train", "--width", "10", "--heads", "3"], "width = 10 is not divisible by heads = 3"),
    (["train", "--corpus", "arithmetic", "--steps", "0"], "steps = 0 must be positive"),
    (["train", "--corpus", "arithmetic", "--layers", "-1"], "layers = -1 must be positive"),
    (["train", "--corpus", "nope"], "nope"),
    (["train"], "give exactly one source of text"),
    (["train", "--corpus", "arithmetic", "--text", "x.txt"], "give exactly one source of text"),
    (["train", "--text", "{tmp}/missing.txt"], "missing.txt"),
    (["train", "--text", "{empty}"], "empty.txt"),
    (["train", "--text", "{latin1}"], "latin1.txt"),
    (["train", "--text", "{short}", "--context", "64"], "shorter than one context window"),
    (["train", "--corpus", "arithmetic", "--resume", "--overwrite"], "contradict"),
    (["train", "--out", "{tmp}/none", "--resume"], "does not exist"),
    (["sample", "{tmp}/none"], "does not exist"),
])
def test_bad_input_gets_one_clear_error(capsys, tmp_path, argv, message):
    files = {"tmp": str(tmp_path), "empty": write(tmp_path / "empty.txt", b""),
             "latin1": write(tmp_path / "latin1.txt", "café au lait\n".encode("latin-1") * 50),
             "short": write(tmp_path / "short.txt", b"just a few characters\n")}
    argv = [a.format(**files) for a in argv]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and "error:" in err and message in err, err


def test_bad_prompts(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "2", "--out", str(out)]) == 0
    code, _, err = run(capsys, "sample", str(out), "--prompt", "12*3")
    assert code == 2 and "'*'" in err
    code, _, err = run(capsys, "sample", str(out), "--prompt", "1+1=", "--max-new-tokens", "13")
    assert code == 2 and "= 17 exceeds the model's context of 16 tokens" in err and "at most 12" in err
    code, _, err = run(capsys, "sample", str(out), "--top-p", "0")
    assert code == 2 and "top_p = 0.0" in err


def test_installed_command_fails_cleanly_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bindir = os.path.dirname(sys.executable)
    result = subprocess.run([os.path.join(bindir, "minilm"), "train", "--corpus", "arithmetic", "--width", "10",
                             "--heads", "4", "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("minilm train: error: width = 10 is not divisible by heads = 4")
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *SMALL, "--steps", "3", "--out", str(out)]) == 0
    return out


FT = ["--corpus", "arithmetic", "--corpus-size", "300", "--batch-size", "4", "--eval-batches", "2", "--steps", "3"]


@pytest.mark.parametrize("spec, trainable", [
    ("rank=2,alpha=4,targets=attn.q,attn.v", 128),  # 1 layer x 2 matrices x rank 2 x (16 + 16)
    ("rank=2,alpha=4,targets=attn.*,fuse_qkv=true", 192),  # q, k, v: one A 16x2 and three B 2x16; o: 2 x (16 + 16)
])
def test_lora_finetune_sample_and_merge_agree(spec, trainable, capsys, tmp_path, base_run):
    code, stdout, _ = run(capsys, "finetune", str(base_run), *FT, "--lora", spec, "--out", str(tmp_path / "ft"))
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "ft" / "adapter").iterdir()) == [
        MARK, "adapter_config.json", "adapter_model.safetensors"]
    assert "blocks.0.attn.q.w" in stdout and "blocks.0.attn.v.w" in stdout
    assert f"trainable {trainable} of" in stdout
    assert ("share one A" in stdout) == ("fuse_qkv" in spec)
    assert "eval loss" in stdout
    greedy = ["--prompt", "1+2=", "--max-new-tokens", "8", "--temperature", "0"]
    code, with_adapter, _ = run(capsys, "sample", str(base_run), "--adapter", str(tmp_path / "ft" / "adapter"), *greedy)
    assert code == 0
    code, _, _ = run(capsys, "merge", str(base_run), str(tmp_path / "ft" / "adapter"), "--out", str(tmp_path / "m"))
    assert code == 0
    code, merged, _ = run(capsys, "sample", str(tmp_path / "m"), *greedy)
    assert code == 0 and merged == with_adapter
    code, _, err = run(capsys, "merge", str(base_run), str(tmp_path / "ft" / "adapter"), "--out", str(tmp_path / "m"))
    assert code == 2 and "already exists" in err


def test_full_finetune_writes_a_resumable_checkpoint(capsys, tmp_path, base_run):
    out = tmp_path / "full"
    assert main(["finetune", str(base_run), *FT, "--full", "--out", str(out)]) == 0
    assert main(["train", "--out", str(out), "--resume", "--steps", "5"]) == 0
    capsys.readouterr()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]


def test_finetune_bad_input(capsys, tmp_path, base_run):
    cases = [
        (["--full", "--lora", "rank=2"], "--full and --lora together"),
        ([], "choose how to fine-tune"),
        (["--lora", "rank=0"], "rank 0"),
        (["--lora", "rank=17"], "rank 17 for blocks.0.attn.q is larger than min(d_in, d_out) = 16"),
        (["--lora", "rank=2,targets=attn.x"], "'attn.x' matches no matrix; valid targets: all-linear, embed, attn.q"),
        (["--lora", "rank=2,targets=embed,use_dora=true"], "DoRA is undefined on the tied embedding"),
        (["--lora", "rank=2,colour=blue"], "unknown option 'colour'"),
        (["--lora", "rank=2,targets=attn.q,mlp.fc,fuse_qkv=true"], "adapt fewer than two of them"),
        (["--full", "--tokenizer", "word"], "the base model's own tokenizer"),
    ]
    for extra, message in cases:
        code, _, err = run(capsys, "finetune", str(base_run), *FT, *extra, "--out", str(tmp_path / "x"))
        assert code == 2 and message in err, (extra, err)


def test_adapter_on_a_different_base_is_refused(capsys, tmp_path, base_run):
    assert main(["finetune", str(base_run), *FT, "--lora", "rank=2", "--out", str(tmp_path / "ft")]) == 0
    other = tmp_path / "other"
    assert main(["train", *SMALL, "--width", "24", "--steps", "1", "--out", str(other)]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "sample", str(other), "--adapter", str(tmp_path / "ft" / "adapter"))
    assert code == 2 and "different base model (width: adapter 16 vs base 24)" in err
    text = tmp_path / "fourteen.txt"
    text.write_text("abcdefghijklm\n" * 200)  # 14 characters, like arithmetic's vocabulary, but others
    same_size = tmp_path / "same_size"
    args = [a for a in SMALL if a not in ("--corpus", "arithmetic", "--corpus-size", "300")]
    assert main(["train", *args, "--text", str(text), "--steps", "1", "--out", str(same_size)]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "sample", str(same_size), "--adapter", str(tmp_path / "ft" / "adapter"))
    assert code == 2 and "another vocabulary of the same size" in err
    (tmp_path / "ft" / "adapter" / "adapter_config.json").write_text("{broken")
    code, _, err = run(capsys, "sample", str(base_run), "--adapter", str(tmp_path / "ft" / "adapter"))
    assert code == 2 and "adapter_config.json is not valid JSON" in err
