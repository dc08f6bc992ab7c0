"""Tests of ascendemu.spec: presets, sources, TOML what-ifs, derived peak numbers.

Reference numbers (ascend-910c.md §1, §4, §7, §18) are typed out again here, not read
from the implementation.
"""
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ascendemu as ae
from ascendemu import spec as S

PRESET_NAMES = ["910c", "910b1", "910b2", "910b3", "910b4"]
FIELD_NAMES = [f.name for f in fields(S.Spec)]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_exist_and_name_themselves(name):
    sp = S.get(name)
    assert isinstance(sp, S.Spec)
    assert sp.name == name
    assert S.get(name.upper()) is sp and S.get("Ascend" + name) is sp
    assert sp.aiv_per_die == 2 * sp.aic_per_die


def test_910c_matches_the_reference():
    sp = S.get("910c")
    assert (sp.aic_per_die, sp.aiv_per_die, sp.clock_mhz, sp.hbm_gib) == (24, 48, 1850.0, 64)
    assert (sp.ub_bytes, sp.l1_bytes, sp.l0a_bytes, sp.l0b_bytes, sp.l0c_bytes) == \
        (192 << 10, 512 << 10, 64 << 10, 64 << 10, 128 << 10)
    assert (sp.bias_table_bytes, sp.fixpipe_buffer_bytes) == (1 << 10, 7 << 10)
    assert (sp.ub_align_bytes, sp.l1_align_bytes, sp.l0a_align_bytes, sp.l0b_align_bytes,
            sp.l0c_align_bytes, sp.bias_table_align_bytes) == (32, 32, 512, 512, 64, 64)
    assert sp.hbm_bytes == 64 << 30
    assert sp.soc_version == "Ascend910_9391"


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_field_has_a_source_and_uncited_ones_say_why(name):
    sp = S.get(name)
    for f in FIELD_NAMES:
        src = sp.source(f)
        assert isinstance(src, str) and src.strip(), f"{name}.{f} has no source"
        if not src.startswith("["):
            assert "assumption" in src or "⚠" in src or src == "preset name", \
                f"{name}.{f}: source {src!r} is neither a citation, an assumption nor a ⚠ note"
    assert sp.source("name") == "preset name"


def test_source_of_unknown_field():
    with pytest.raises(KeyError, match="Spec has no field 'warp_size'"):
        S.get("910c").source("warp_size")


def test_describe_lists_every_field_with_its_source():
    text = S.get("910c").describe()
    lines = text.splitlines()
    assert len(lines) == len(FIELD_NAMES)
    assert "clock_mhz = 1850.0  # [INI] cube_freq" in text


def test_peak_numbers_derive_from_the_spec():
    sp = S.get("910c")
    assert round(sp.peak_cube_ops_per_s("int8") / 1e12, 1) == 727.4
    assert round(sp.peak_cube_ops_per_s("float16") / 1e12, 1) == 363.7
    assert round(sp.peak_cube_ops_per_s("bfloat16") / 1e12, 1) == 363.7
    assert sp.peak_cube_ops_per_s("float32") == sp.peak_cube_ops_per_s("float16") / 4
    # a what-if clock changes the peak in proportion
    fast = S.replace(sp, "what-if", clock_mhz=1910)
    assert fast.peak_cube_ops_per_s("float16") == pytest.approx(sp.peak_cube_ops_per_s("float16") * 1910 / 1850)
    assert sp.peak_hbm_bytes_per_s == 865 * 1850e6
    assert sp.cycles_to_us(1850) == 1.0


def test_replace_records_the_source_and_keeps_earlier_overrides():
    a = S.replace(S.get("910c"), "what-if: slower clock", clock_mhz=1000)
    b = S.replace(a, "what-if: small UB", ub_bytes=64 << 10)
    assert (b.clock_mhz, b.ub_bytes) == (1000.0, 64 << 10)
    assert b.source("clock_mhz") == "what-if: slower clock"
    assert b.source("ub_bytes") == "what-if: small UB"
    assert b.source("l1_bytes") == S.get("910c").source("l1_bytes")
    assert S.get("910c").clock_mhz == 1850.0  # presets are untouched


def write(tmp_path, text):
    p = tmp_path / "whatif.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_load_plain_and_sourced_values(tmp_path):
    p = write(tmp_path, 'preset = "910b4"\n[overrides]\nclock_mhz = 1900\n'
                        'hbm_bytes_per_cycle = { value = 800, source = "what-if: slower HBM" }\n')
    sp = S.load(p)
    assert sp.name == "910b4" and sp.aic_per_die == S.get("910b4").aic_per_die
    assert sp.clock_mhz == 1900.0 and isinstance(sp.clock_mhz, float)
    assert sp.hbm_bytes_per_cycle == 800
    assert sp.source("hbm_bytes_per_cycle") == "what-if: slower HBM"
    assert sp.source("clock_mhz") == f"override from {p}"
    assert sp.source("ub_bytes") == "[INI] ub_size"


def test_load_defaults_to_910c(tmp_path):
    sp = S.load(write(tmp_path, "[overrides]\nqueue_depth = { value = 8 }\n"))
    assert sp.name == "910c" and sp.queue_depth == 8


@pytest.mark.parametrize("text, exc, match", [
    ("[overrides]\nwarp_size = 32\n", KeyError, r"Spec has no field 'warp_size'; fields are: .*clock_mhz"),
    ("[overrides]\nub_bytes = \"big\"\n", TypeError, r"Spec field 'ub_bytes' takes int, got 'big'"),
    ("[overrides]\nub_bytes = 1.5\n", TypeError, r"Spec field 'ub_bytes' takes int, got 1.5"),
    ("[overrides]\nub_bytes = true\n", TypeError, r"Spec field 'ub_bytes' takes int, got True"),
    ("[overrides]\nname = 3\n", TypeError, r"Spec field 'name' takes str, got 3"),
    ('preset = "910z"\n', KeyError, r"unknown chip preset '910z'; presets are: 910c, 910b1"),
    ("clock_mhz = 1900\n", KeyError, r"unknown top-level keys \['clock_mhz'\]; expected 'preset' and \[overrides\]"),
    ("[overrides]\nclock_mhz = { val = 3 }\n", KeyError, r"override 'clock_mhz' must be a value or"),
    ("overrides = 3\n", TypeError, r"'overrides' must be a table"),
])
def test_load_errors(tmp_path, text, exc, match):
    with pytest.raises(exc, match=match):
        S.load(write(tmp_path, text))


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown chip preset '910x'; presets are: 910c, 910b1, 910b2, 910b3, 910b4"):
        S.get("910x")
    with pytest.raises(KeyError, match="unknown chip preset"):
        ae.Die("h100")


@settings(deadline=None)
@given(ub_kib=st.integers(1, 1024), clock=st.floats(100, 4000, allow_nan=False))
def test_die_accepts_a_spec(ub_kib, clock):
    sp = S.replace(S.get("910c"), "what-if", ub_bytes=ub_kib << 10, clock_mhz=clock)
    die = ae.Die(sp, functional=False)
    assert die.spec is sp
    assert die.spec.ub_bytes == ub_kib << 10
    assert die.spec.clock_mhz == clock
