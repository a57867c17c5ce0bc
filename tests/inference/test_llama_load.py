"""Which llama.cpp weight buffers a node asks for: AMX tiles off where they may crash the process."""
import pytest

from services.inference.adapters.llama_model import cpu_flags, use_extra_buffers


def test_auto_turns_extra_buffers_off_on_a_cpu_that_advertises_amx():
    assert use_extra_buffers("auto", {"avx2", "avx512f", "amx_tile", "amx_int8"}) is False
    assert use_extra_buffers("auto", {"avx2", "fma", "f16c"}) is True


def test_on_and_off_force_the_choice():
    assert use_extra_buffers("on", {"amx_tile"}) is True
    assert use_extra_buffers("off", {"avx2"}) is False


def test_an_unknown_choice_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="cpu_extra_buffers"):
        use_extra_buffers("maybe", set())


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_tile\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "amx_tile"}
    assert cpu_flags(str(tmp_path / "missing")) == set()
