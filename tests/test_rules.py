"""Reward rules run isolated (DESIGN.md "Runs, outputs, failures")."""


def test_sys_exit_in_a_pipeline_file_is_a_load_error(tmp_path, capsys):
    from rlflow.cli import main

    f = tmp_path / "quits.py"
    f.write_text("import sys\nsys.exit(0)\n")
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert "RF105" in err and f"{f}:2" in err and "sys.exit(0)" in err
