"""Bad input, as a new user types it: every value is either taken with the effect it names or refused
with one line that names the field or flag and the value, exit status 2, never a traceback.

Two properties (hypothesis) run over every config field (from `dataclasses.fields`, not a copied list)
and over the command-line flags generated from them; then one test per defect of issue 15 (1-11),
each of which failed on the code before the fixes.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora import LoraConfig
from minilm import folders
from minilm.cli import main
from minilm.cli.flags import cli_fields, flag, value_type
from minilm.config import DataConfig, ModelConfig, SampleConfig, TrainConfig, check_types
from minilm.errors import MinilmError

CONFIGS = (ModelConfig, TrainConfig, DataConfig, SampleConfig, LoraConfig)
SMALL = ["--corpus", "arithmetic", "--corpus-size", "300", "--context", "16", "--width", "16", "--layers", "1",
         "--heads", "2", "--batch-size", "4", "--eval-batches", "2"]
FT = ["--corpus", "arithmetic", "--corpus-size", "300", "--batch-size", "4", "--eval-batches", "2", "--steps", "2"]
PROPERTY = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals (a flag's bad value, an unknown flag) exit 2
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, command):
    """exit 2 and exactly one line on stderr, `minilm COMMAND: error: ...`; its message."""
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith(f"minilm {command}: error: "), err
    assert "Traceback" not in err
    return err


def is_scalar(cls, f) -> bool:
    """bool, int, float or str, or one of them | None; not a tuple or a mapping."""
    hint = typing.get_type_hints(cls)[f.name]
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return all(k in (bool, int, float, str, type(None)) for k in kinds)


FIELDS = [(cls, f) for cls in CONFIGS for f in dataclasses.fields(cls) if is_scalar(cls, f)]
CONTAINER_FIELDS = [(cls, f) for cls in CONFIGS for f in dataclasses.fields(cls) if not is_scalar(cls, f)]

ANY_VALUE = st.one_of(
    st.integers(-2**40, 2**40), st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, -0.0, 1e-300, 1e300]),
    st.text(max_size=6), st.booleans(), st.none(), st.lists(st.integers(0, 3), max_size=2),
    st.sampled_from(["64", "nan", "", "char", "word", "auto", "float32", "bfloat16", "standard", "none"]))


def names_the_value(message: str, name: str, value) -> bool:
    return name in message and any(text in message for text in (repr(value), str(value)))


def check_accepted(cfg, name, value):
    """An accepted value is held exactly, with its declared type, and the config stays valid."""
    held = getattr(cfg, name)
    assert held == value and type(held) is type(value), (name, value, held)
    check_types(cfg)  # every field of its declared type, every float finite
    assert dataclasses.replace(cfg) == cfg  # validation is repeatable: the same config is valid again
    if isinstance(cfg, ModelConfig):
        assert cfg.width % cfg.heads == 0 and min(cfg.context, cfg.width, cfg.layers, cfg.heads) > 0
    if isinstance(cfg, TrainConfig):
        assert 0 <= cfg.min_lr <= cfg.lr and 0 <= cfg.warmup < 1 and cfg.grad_clip >= 0 and cfg.seed >= 0
    if isinstance(cfg, SampleConfig):
        assert 0 < cfg.top_p <= 1 and cfg.temperature >= 0 and cfg.seed >= 0


@pytest.mark.parametrize("cls, f", FIELDS, ids=[f"{c.__name__}.{f.name}" for c, f in FIELDS])
@PROPERTY
@given(value=ANY_VALUE)
def test_every_config_field_takes_a_value_or_names_it(cls, f, value):
    try:
        cfg = cls(**{f.name: value})
    except MinilmError as e:
        message = str(e)
        assert "\n" not in message and names_the_value(message, f.name, value), message
        return
    check_accepted(cfg, f.name, value)


@pytest.mark.parametrize("cls, f", CONTAINER_FIELDS, ids=[f"{c.__name__}.{f.name}" for c, f in CONTAINER_FIELDS])
@settings(deadline=None, max_examples=25)
@given(value=st.one_of(st.text(max_size=4), st.none(), st.lists(st.text(max_size=3), max_size=2), st.integers()))
def test_container_fields_take_a_container_or_name_the_value(cls, f, value):
    try:
        cfg = cls(**{f.name: value})
    except MinilmError as e:
        assert names_the_value(str(e), f.name, value), str(e)
        return
    hint = typing.get_type_hints(cls)[f.name]
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    assert any(isinstance(getattr(cfg, f.name), typing.get_origin(k) or k) for k in kinds), (f.name, value)


# ---------------------------------------------------------------- flags, through minilm.cli.main

FLAG_TEXT = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "3", "-0", "1e400", "1e-30", "2147483648", "1e3",
                     "16.5", "abc", "", "true", "-1e-3", "0.5", "char", "float32", "bfloat16", "grammar"]),
    st.integers(-3, 40).map(str), st.floats(-10, 10).map(repr))
TRAIN_FLAGS = [(cls, f) for cls in (ModelConfig, TrainConfig, DataConfig) for f in cli_fields(cls)
               if f.name not in ("corpus", "text")]  # the source of text is SMALL's; --text files have their test
SAMPLE_FLAGS = [(SampleConfig, f) for f in cli_fields(SampleConfig) if value_type(SampleConfig, f.name) is not bool]


def judge_flag(code, err, command, cls, f, text, held):
    if code == 0:
        assert held is not None
        kind = value_type(cls, f.name)
        expected = float(text) if kind is float else int(text) if kind is int else text
        assert getattr(held, f.name) == expected, (f.name, text, getattr(held, f.name))
        return
    message = one_line_error(code, err, command)
    assert flag(f.name) in message or f"{f.name} =" in message, message
    shown = {repr(text), text} | ({str(float(text))} if _is_float(text) else set())
    if text.lstrip("-").isdigit():
        shown.add(str(int(text)))
    assert any(s in message for s in shown if s), message


def _is_float(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def dry_run(code, out):
    """The configs a `--dry-run` resolved (it checks every input and writes nothing), or None."""
    return json.loads(out.splitlines()[-1]) if code == 0 else None


@PROPERTY
@given(index=st.integers(0, len(TRAIN_FLAGS) - 1), text=FLAG_TEXT)
def test_train_flags_take_a_value_or_name_it(index, text, capsys, tmp_path_factory):
    cls, f = TRAIN_FLAGS[index]
    if value_type(cls, f.name) is bool:
        argv, text = [flag(f.name) if text != "0" else "--no-" + f.name.replace("_", "-")], text != "0"
    else:
        argv = [flag(f.name), text]
    steps = [] if f.name == "steps" else ["--steps", "3"]
    out = tmp_path_factory.mktemp("run") / "run"
    code, stdout, err = run(capsys, "train", *SMALL, *steps, *argv, "--out", out, "--dry-run")
    assert not out.exists()  # a dry run writes nothing
    resolved = dry_run(code, stdout)
    section = {ModelConfig: "model", TrainConfig: "train", DataConfig: "data"}[cls]
    held = None if resolved is None else cls(**resolved[section])
    if value_type(cls, f.name) is bool:
        assert code == 0 and getattr(held, f.name) is text
    else:
        judge_flag(code, err, "train", cls, f, text, held)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *SMALL, "--steps", "3", "--checkpoint-every", "1", "--out", str(out)]) == 0
    return out


@PROPERTY
@given(index=st.integers(0, len(SAMPLE_FLAGS) - 1), text=FLAG_TEXT)
def test_sample_flags_take_a_value_or_name_it(index, text, capsys, base_run):
    cls, f = SAMPLE_FLAGS[index]
    argv = ["sample", base_run, "--prompt", "1", flag(f.name), text, "--dry-run"]
    if f.name != "max_new_tokens":
        argv += ["--max-new-tokens", "4"]
    code, stdout, err = run(capsys, *argv)
    resolved = dry_run(code, stdout)
    judge_flag(code, err, "sample", cls, f, text, None if resolved is None else SampleConfig(**resolved["sample"]))


LORA_FIELDS = [f for f in dataclasses.fields(LoraConfig) if is_scalar(LoraConfig, f)
               and value_type(LoraConfig, f.name) in (int, float, bool)]


@PROPERTY
@given(index=st.integers(0, len(LORA_FIELDS) - 1), text=FLAG_TEXT)
def test_lora_keys_take_a_value_or_name_it(index, text):
    from lora import parse_spec

    f = LORA_FIELDS[index]
    try:
        cfg = parse_spec(f"{f.name}={text}")
    except MinilmError as e:
        message = str(e)
        kind = value_type(LoraConfig, f.name)
        as_read = [str(kind(text))] if kind is int and re.fullmatch(r"[+-]?\d+", text.strip()) else []
        assert "\n" not in message and f.name in message and (repr(text) in message or text in message or
                                                             str(float(text)) in message or
                                                             any(a in message for a in as_read)), message
        assert "invalid literal" not in message
        return
    kind = value_type(LoraConfig, f.name)
    assert getattr(cfg, f.name) == (kind(text) if kind is not bool else getattr(cfg, f.name))


# ---------------------------------------------------------------- the defects of issue 15, one test each

def files_of(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".minilm.lock"}


def test_1_divergence_stops_and_keeps_the_good_checkpoint(capsys, tmp_path, base_run):
    code, _, err = run(capsys, "train", *SMALL, "--steps", "20", "--lr", "1e4", "--out", tmp_path / "new")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("minilm train: error: ") and "lr" in err
    assert not (tmp_path / "new" / "checkpoint").exists()  # nothing diverged was saved

    good = tmp_path / "good"
    assert main(["train", *SMALL, "--steps", "3", "--out", str(good)]) == 0
    before = files_of(good / "checkpoint")
    capsys.readouterr()
    code, _, err = run(capsys, "train", "--out", good, "--resume", "--steps", "30", "--lr", "1e4",
                       "--checkpoint-every", "50")
    assert code == 2 and "is kept" in err.strip().splitlines()[-1], err
    assert files_of(good / "checkpoint") == before  # byte for byte

    one_line_error(*run(capsys, "sample", base_run, "--temperature", "nan")[::2], "sample")
    one_line_error(*run(capsys, "train", *SMALL, "--weight-decay", "nan", "--out", tmp_path / "wd")[::2], "train")
    one_line_error(*run(capsys, "finetune", base_run, *FT, "--lora", "rank=2,alpha=nan",
                        "--out", tmp_path / "ft")[::2], "finetune")


def test_2_finetune_lora_takes_lr(capsys, tmp_path, base_run):
    code, _, err = run(capsys, "finetune", base_run, *FT, "--lora", "rank=2,alpha=4", "--lr", "2e-3",
                       "--out", tmp_path / "ft")
    assert code == 0, err
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()


def test_3_overwrite_never_deletes_what_minilm_did_not_write_nor_an_input(capsys, tmp_path, base_run):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    ft = tmp_path / "ft"
    assert main(["finetune", str(base_run), *FT, "--lora", "rank=2", "--out", str(ft)]) == 0
    capsys.readouterr()
    before = files_of(base_run)
    for argv in (["merge", base_run, ft / "adapter", "--out", precious, "--overwrite"],
                 ["compare", base_run, ft / "adapter", "--out", precious, "--overwrite"],
                 ["compare", base_run, ft / "adapter", "--out", base_run, "--overwrite"],
                 ["merge", base_run, ft / "adapter", "--out", base_run, "--overwrite"]):
        one_line_error(*run(capsys, *argv)[::2], argv[0])
    assert (precious / "thesis.txt").read_text() == "years of work"
    assert files_of(base_run) == before


def test_4_a_second_run_on_one_folder_is_refused_naming_the_first(capsys, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from minilm import folders; "  # as a train
                               f"folders.lock({str(out)!r}); folders.mark({str(out)!r}, 'run'); "  # run starting
                               "print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = one_line_error(*run(capsys, "train", *SMALL, "--steps", "2", "--out", out)[::2], "train")
        assert f"pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "metrics.jsonl").exists()


def test_5_a_kill_between_renames_is_recovered_never_deleted(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "3", "--out", str(out)]) == 0
    saved = files_of(out / "checkpoint")
    (out / "checkpoint").rename(out / "checkpoint.old")  # what a kill between the two renames leaves
    capsys.readouterr()
    err = one_line_error(*run(capsys, "train", *SMALL, "--steps", "3", "--out", out)[::2], "train")
    assert "--resume" in err and files_of(out / "checkpoint.old") == saved

    first = tmp_path / "first"
    (first / "checkpoint.tmp").mkdir(parents=True)  # a kill during the very first save
    (first / "checkpoint.tmp" / ".minilm.lock").write_text("")
    err = one_line_error(*run(capsys, "train", "--out", first, "--resume", "--steps", "3")[::2], "train")
    assert "no checkpoint was completed yet" in err


def test_6_a_symlinked_checkpoint_is_followed(capsys, tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "disk2" / "checkpoint"
    assert main(["train", *SMALL, "--steps", "2", "--out", str(out)]) == 0
    elsewhere.parent.mkdir()
    (out / "checkpoint").rename(elsewhere)
    (out / "checkpoint").symlink_to(elsewhere, target_is_directory=True)
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--checkpoint-every", "1"]) == 0
    assert (out / "checkpoint").is_symlink()
    assert json.loads((elsewhere / "state.json").read_text())["step"] == 4
    assert main(["train", "--out", str(out), "--resume", "--steps", "5"]) == 0


FILE_SIZE_LIMITED = """
import resource, signal, sys
from minilm.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk fails
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # room for metrics lines, not for a checkpoint
sys.exit(main(sys.argv[1:]))
"""


def test_7_a_full_disk_is_one_line_with_the_previous_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "2", "--out", str(out)]) == 0
    folders.release(out)
    before = files_of(out / "checkpoint")
    env = {**os.environ, "MINILM_MALLOC_TUNING": "0", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED, "train", "--out", str(out), "--resume",
                           "--steps", "4"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("minilm train: error: ")]
    assert "could not save" in line and "File too large" in line and "intact" in line
    assert files_of(out / "checkpoint") == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_8_an_altered_adapter_or_another_base_is_refused(capsys, tmp_path, base_run):
    ft, other = tmp_path / "ft", tmp_path / "other"
    assert main(["finetune", str(base_run), *FT, "--lora", "rank=2", "--out", str(ft)]) == 0
    assert main(["train", *SMALL, "--steps", "3", "--seed", "1", "--out", str(other)]) == 0  # same shape and vocabulary
    capsys.readouterr()
    err = one_line_error(*run(capsys, "sample", other, "--max-new-tokens", "3", "--adapter", ft / "adapter")[::2],
                         "sample")
    assert "--allow-other-base" in err
    assert run(capsys, "sample", other, "--max-new-tokens", "3", "--adapter", ft / "adapter",
               "--allow-other-base")[0] == 0
    arrays = ft / "adapter" / "adapter_model.safetensors"
    data = bytearray(arrays.read_bytes())
    data[-4:] = b"\x00\x00\x8f\x42"  # one value becomes 71.5
    arrays.write_bytes(bytes(data))
    err = one_line_error(*run(capsys, "sample", base_run, "--max-new-tokens", "3", "--adapter", ft / "adapter")[::2],
                         "sample")
    assert "SHA-256" in err


def damaged_copy(base_run, tmp_path, name, file, edit):
    import shutil

    copy = tmp_path / name
    shutil.copytree(base_run, copy)
    path = copy / "checkpoint" / file
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    state_path = copy / "checkpoint" / "state.json"  # as if saved before digests of the JSON files: their
    state = json.loads(state_path.read_text())      # own checks are reached (a digest would catch the edit)
    state["sha256"].pop(file, None)
    state_path.write_text(json.dumps(state))
    return copy


def test_9_no_traceback_for_resources_files_and_paths(capsys, tmp_path, base_run):
    (tmp_path / "afile").write_text("x")
    width = damaged_copy(base_run, tmp_path, "w", "config.json", lambda d: d["model"].update(width=16.0))
    batch = damaged_copy(base_run, tmp_path, "b", "config.json", lambda d: d["train"].update(batch_size=32.5))
    step = damaged_copy(base_run, tmp_path, "s", "state.json", lambda d: d.update(step=-5))
    cases = [
        ("train", *SMALL, "--width", "1000000", "--out", tmp_path / "big"),
        ("train", *SMALL, "--layers", "100000000", "--out", tmp_path / "deep"),
        ("train", *SMALL, "--steps", "1e20", "--out", tmp_path / "long"),
        ("sample", base_run, "--max-new-tokens", "3", "--num-samples", "100000000"),
        ("sample", width), ("sample", batch), ("train", "--out", step, "--resume", "--steps", "9"),
        ("train", *SMALL, "--out", tmp_path / "afile"), ("train", *SMALL, "--out", tmp_path / "afile" / "x"),
        ("finetune", base_run, *FT, "--full", "--out", tmp_path / "afile"),
        ("merge", base_run, base_run, "--out", tmp_path / "afile" / "x"),
        ("compare", base_run, base_run, "--out", tmp_path / "afile" / "x"),
        ("train", *SMALL, "--out", "/tmp/" + "p" * 5000),
        ("train", *SMALL, "--out", tmp_path / ("n" * 300)),
        ("sample", "/tmp/" + "p" * 5000),
    ]
    for argv in cases:
        err = one_line_error(*run(capsys, *argv)[::2], argv[0])
        assert len(err) < 600, err  # a 5,000-character path is shortened


def test_10_no_silent_wrong_effect(capsys, tmp_path, base_run):
    err = one_line_error(*run(capsys, "train", *SMALL, "--grad-clip", "nan", "--out", tmp_path / "c")[::2], "train")
    assert "grad_clip = nan" in err
    err = one_line_error(*run(capsys, "compare", base_run, base_run, "--epsilon", "nan",
                              "--out", tmp_path / "r")[::2], "compare")
    assert "--epsilon nan" in err
    err = one_line_error(*run(capsys, "train", "--out", base_run, "--resume", "--steps", "2")[::2], "train")
    assert "at step 3" in err and "--steps is 2" in err


def test_11_messages_name_the_value_and_the_fix(capsys, tmp_path, base_run):
    err = one_line_error(*run(capsys, "train", *SMALL, "--lr", "nan", "--out", tmp_path / "x")[::2], "train")
    assert "lr = nan" in err and "min_lr" not in err
    err = one_line_error(*run(capsys, "sample", base_run, "--prompt", "1+1=2\n" * 5)[::2], "sample")
    assert "-" not in err.split("error:")[1].replace("--", "")  # no "at most -36"
    err = one_line_error(*run(capsys, "compare", base_run, base_run, "--words", "zebra,justice", "--no-corpus-probe",
                              "--out", tmp_path / "r")[::2], "compare")
    assert "shape" not in err and "vocabulary" in err
    width = damaged_copy(base_run, tmp_path, "w", "config.json", lambda d: d["model"].update(width="64"))
    err = one_line_error(*run(capsys, "sample", width)[::2], "sample")
    assert "config.json" in err and "width = '64'" in err
    tok = damaged_copy(base_run, tmp_path, "t", "tokenizer.json", lambda d: d.update(kind="bpe"))
    err = one_line_error(*run(capsys, "sample", tok)[::2], "sample")
    assert "tokenizer.json" in err
    err = one_line_error(*run(capsys, "bench", "--vocab-size", "0")[::2], "bench")
    assert "--vocab-size 0" in err and "dataclasses" not in err
    err = one_line_error(*run(capsys, "finetune", base_run, *FT, "--lora", "rank=abc", "--out", tmp_path / "f")[::2],
                         "finetune")
    assert "rank='abc'" in err and "invalid literal" not in err


def test_a_negative_float_is_a_value_not_a_flag(capsys, tmp_path):
    for text, message in (("-1e-3", "lr = -0.001 must be positive"), ("-inf", "lr = -inf must be a finite")):
        err = one_line_error(*run(capsys, "train", *SMALL, "--lr", text, "--out", tmp_path / "x")[::2], "train")
        assert message in err


def test_an_unknown_flag_is_named_by_its_command(capsys):
    err = one_line_error(*run(capsys, "train", "--bogus", "1")[::2], "train")
    assert "--bogus" in err and "minilm train --help" in err


def test_an_adapter_where_a_model_belongs(capsys, tmp_path, base_run):
    ft = tmp_path / "ft"
    assert main(["finetune", str(base_run), *FT, "--lora", "rank=2", "--out", str(ft)]) == 0
    capsys.readouterr()
    for argv in (["sample", ft], ["sample", ft / "adapter"], ["finetune", ft / "adapter", *FT, "--full"],
                 ["merge", ft / "adapter", ft / "adapter", "--out", tmp_path / "m"]):
        err = one_line_error(*run(capsys, *argv)[::2], argv[0])
        assert "holds a LoRA adapter, not a model" in err
    err = one_line_error(*run(capsys, "train", "--out", ft, "--resume", "--steps", "9")[::2], "train")
    assert "holds no checkpoint" in err
