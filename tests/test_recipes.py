"""The shipped recipes: found from any directory (--gin_file and include), listed by `t5lite recipes`;
`t5lite --version`; an undefined %MACRO named with its file and line. No training: parsing only."""

import json
import os
import subprocess
import tomllib


from t5lite import gin_utils, provenance
from t5lite.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")


def _one_line_error(argv, capsys, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t5lite: error: "), err
    for text in expected:
        assert text in err[0], err


def _emb_dim(argv, capsys) -> str:
    """The T5Config.emb_dim line of `train ... --print_config`."""
    assert main(["train", *argv, "--model_dir=unused", "--print_config"]) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("T5Config.emb_dim"))


def test_recipes_resolve_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # The repo's path and the path inside the recipes name the same shipped files.
    assert _emb_dim(["--gin_file=experiments/demo/pretrain.gin", "--gin_file=models/tiny.gin"], capsys) == \
        "T5Config.emb_dim = 64"
    assert _emb_dim(["--gin_file=demo/pretrain.gin"], capsys) == "T5Config.emb_dim = 128"
    # A user's own file includes a shipped run file and model size.
    (tmp_path / "mine.gin").write_text("include 'experiments/demo/pretrain.gin'\ninclude 'models/tiny.gin'\n"
                                       "T5Config.emb_dim = 32\n")
    assert _emb_dim(["--gin_file=mine.gin"], capsys) == "T5Config.emb_dim = 32"


def test_working_directory_first_and_includes_next_to_their_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # A file of the working directory wins over the shipped one of the same name ...
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gin").write_text("include 'experiments/models/tiny.gin'\nT5Config.emb_dim = 48\n")
    assert _emb_dim(["--gin_file=demo/pretrain.gin", "--gin_file=models/tiny.gin"], capsys) == \
        "T5Config.emb_dim = 48"
    # ... but a shipped recipe's own includes mean the same from every directory: ablations/gqa.gin includes
    # 'demo/pretrain.gin', and a demo/pretrain.gin in the working directory does not replace it.
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "pretrain.gin").write_text("T5Config.emb_dim = 40\n")
    assert _emb_dim(["--gin_file=ablations/gqa.gin"], capsys) == "T5Config.emb_dim = 128"
    # A user file's include is found next to it before the working directory.
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "run.gin").write_text("include 'demo/pretrain.gin'\ninclude 'size.gin'\n")
    (tmp_path / "proj" / "size.gin").write_text("T5Config.emb_dim = 24\n")
    (tmp_path / "size.gin").write_text("T5Config.emb_dim = 16\n")
    assert _emb_dim(["--gin_file=proj/run.gin"], capsys) == "T5Config.emb_dim = 24"


def test_missing_gin_file_or_include_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _one_line_error(["train", "--gin_file=models/t5_9_base.gin", "--model_dir=x"], capsys,
                    "gin file models/t5_9_base.gin not found", "`t5lite recipes` lists them")
    (tmp_path / "run.gin").write_text("include 'models/nope.gin'\n")
    _one_line_error(["train", "--gin_file=run.gin", "--model_dir=x"], capsys,
                    f"{tmp_path / 'run.gin'}: include 'models/nope.gin' not found")


def test_recipes_lists_every_shipped_file(capsys):
    on_disk = sorted(os.path.relpath(os.path.join(d, f), EXPERIMENTS).replace(os.sep, "/")
                     for d, _, files in os.walk(EXPERIMENTS) for f in files if f.endswith((".gin", ".toml")))
    assert main(["recipes", "--paths"]) == 0
    assert capsys.readouterr().out.split() == on_disk
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{len(on_disk)} shipped recipes in ")
    tiny = next(line for line in out if line.split()[0] == "models/tiny.gin")
    assert "The tiny model" in tiny  # the first line of its header comment


def test_version_is_pyproject_version(capsys):
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"t5lite {version}"


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


def test_build_info_records_the_checkout(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("a\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    info = provenance.build_info(str(tmp_path))
    assert (info["commit"], info["dirty"], info["diff_sha256"]) == (head, False, None)
    (tmp_path / "a.txt").write_text("b\n")
    assert provenance.build_info(str(tmp_path))["dirty"] is True
    assert provenance.build_info(str(tmp_path / "..")) is None  # not the top of a checkout
    json.dumps(info)  # what setup.py writes into the wheel


def test_recipes_dir_is_experiments_in_a_checkout():
    assert gin_utils.RECIPES_DIR == EXPERIMENTS


def test_a_shipped_sweep_file_and_its_gin_files_resolve_from_any_directory(tmp_path, monkeypatch):
    from t5lite.scaling.spec import build_sweep
    monkeypatch.chdir(tmp_path)
    sweep = build_sweep("scaling/tiny.toml")
    assert [os.path.relpath(f, EXPERIMENTS) for f in sweep.gin_files] == ["scaling/tiny.gin"]
    assert build_sweep(gin_files=["models/tiny.gin"]).gin_files == (os.path.join(EXPERIMENTS, "models", "tiny.gin"),)
