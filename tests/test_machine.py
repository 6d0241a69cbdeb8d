"""minilm.machine: the CPU a timing ran on, read from a cpuinfo file (here written by the test)."""

from __future__ import annotations

from minilm import machine

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8
"""


def test_features_are_read_from_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    features = machine.cpu_features(str(path))
    assert features["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    # the speed flags in SPEED_FLAGS' order, then the other avx512*/amx* ones; nothing else
    assert features["flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
                                 "amx_int8", "avx512dq"]
    assert features["all_flags"][:2] == ["fpu", "sse2"]
    assert "bfloat16 products in AMX" in machine.describe(features)


def test_without_bf16_instructions_the_line_says_so(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("model name\t: Old CPU\nflags\t\t: avx2 fma\n")
    line = machine.describe(machine.cpu_features(str(path)))
    assert line.startswith("CPU: Old CPU") and "flags avx2 fma;" in line and "converted to float32" in line
    path.write_text("model name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_bf16\n")
    assert "avx512_bf16), no AMX" in machine.describe(machine.cpu_features(str(path)))


def test_no_cpuinfo_gives_empty_flags(tmp_path):
    features = machine.cpu_features(str(tmp_path / "missing"))
    assert features["flags"] == [] and features["all_flags"] == [] and features["model"]
