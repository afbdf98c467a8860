"""The ncu source-page summary: per-kernel totals and opcodes from a file in ncu's CSV shape."""

from __future__ import annotations

import json

from bench.kernels.sass_summary import main, opcode, parse

NCU_CSV = """\
"Kernel Name","void escort_conv<(int)2, (int)8>(const float *)",
"Address","Source","# Samples","Instructions Executed","Thread Instructions Executed"
"0x7f00","LDS.64 R36, [R57]","3","100","3200"
"0x7f10","@!P0 FFMA.FTZ R37, R36, R37, R27","1","250","8000"
"0x7f20","FFMA R25, R42, R54, R25","0","50","1600"
"0x7f30","EXIT","0","",""
"Kernel Name","void escort_conv_half<(int)1, (int)8>(const unsigned short *)",
"Address","Source","# Samples","Instructions Executed","Thread Instructions Executed"
"0x8f00","HFMA2 R1, R2, R3, R1","2","40","1280"
"""


def test_opcode_drops_the_guard_and_the_modifiers() -> None:
    assert opcode("@!P0 LDS.64 R36, [R57]") == "LDS"
    assert opcode("FFMA.FTZ R1, R2, R3, R4") == "FFMA"
    assert opcode("") == "?"


def test_each_kernel_section_is_summed_on_its_own() -> None:
    first, second = parse(NCU_CSV.splitlines())
    assert first["kernel"].startswith("void escort_conv<")
    assert first["instructions"] == 400
    assert first["by_opcode"] == {"FFMA": 300, "LDS": 100, "EXIT": 0}
    assert first["hottest"][0] == {"count": 250, "source": "@!P0 FFMA.FTZ R37, R36, R37, R27"}
    assert second["instructions"] == 40 and second["by_opcode"] == {"HFMA2": 40}


def test_main_writes_json_and_markdown(tmp_path) -> None:
    src = tmp_path / "sass.csv"
    src.write_text(NCU_CSV)
    assert main([str(src), "--out", str(tmp_path / "out")]) == 0
    kernels = json.loads((tmp_path / "out" / "sass-summary.json").read_text())
    assert [k["instructions"] for k in kernels] == [400, 40]
    md = (tmp_path / "out" / "sass-summary.md").read_text()
    assert "| 0 | `void escort_conv<(int)2, (int)8>(const float *)` | 400 | FFMA 75.0% |" in md


def test_a_file_that_is_not_the_source_page_is_refused(tmp_path, capsys) -> None:
    src = tmp_path / "details.csv"
    src.write_text('"ID","Metric Name"\n"0","Duration"\n')
    assert main([str(src), "--out", str(tmp_path / "out")]) == 1
    assert "no 'Kernel Name' sections" in capsys.readouterr().err
