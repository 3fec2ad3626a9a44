"""gin's one-line errors: an undefined %MACRO named with its file and line."""

import os

from t5lite.cli import main


def _one_line_error(argv, capsys, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t5lite: error: "), err
    for text in expected:
        assert text in err[0], err


def test_undefined_macro_names_the_macro_and_the_file(tmp_path, capsys):
    run = tmp_path / "run.gin"
    run.write_text("include 'demo/pretrain.gin'\ninclude 'models/tiny.gin'\n"
                   "# '%NOT_A_MACRO' in a comment\ntrain.warmup_steps = %WARMUP\n")
    _one_line_error(["train", f"--gin_file={run}", f"--model_dir={tmp_path / 'm'}"], capsys,
                    f"%WARMUP ({run}:4) is used but no gin file or flag defines it", "--gin.WARMUP=VALUE")
    _one_line_error(["train", "--gin_file=experiments/demo/pretrain.gin", f"--model_dir={tmp_path / 'm'}",
                     "--gin.train.log_period=%LOG_EVERY"], capsys,
                    "%LOG_EVERY (--gin.train.log_period=%LOG_EVERY) is used")
    assert not os.path.exists(tmp_path / "m")
    # The fix the message names is accepted (a macro the files use is not a typo).
    assert main(["train", f"--gin_file={run}", "--model_dir=unused", "--gin.WARMUP=3", "--print_config"]) == 0
    assert "WARMUP = 3" in capsys.readouterr().out
