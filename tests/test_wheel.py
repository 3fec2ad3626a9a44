"""The wheel works outside the clone: built from a copy of this tree, installed into a fresh virtual environment
(offline: its dependencies are the ones this interpreter already has), run from a directory that is not the repo.

Also an editable install (what `make install` does) of the same copy still finds the recipes in experiments/.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib

import pytest

from t5lite import provenance

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = "ulimit -v 8000000; "  # each subprocess: 8 GB of address space at most


def _run(argv, cwd, timeout=300, **env):
    """Runs argv under the memory limit without the repo on PYTHONPATH; returns stdout (asserts exit 0)."""
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    clean.update(env)
    done = subprocess.run(["bash", "-c", LIMIT + 'exec "$@"', "bash", *map(str, argv)], cwd=cwd, env=clean,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def _venv(path):
    """A fresh venv that sees this interpreter's site-packages (the dependencies) after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    purelib = subprocess.run([path / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "_t5lite_test_dependencies.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    return path / "bin"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(work dir, wheel venv's bin, source copy, the copy's commit)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for rel in provenance.tree_files(REPO):  # what git tracks or would track: no .venv, runs, build, caches
        if os.path.isfile(os.path.join(REPO, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(REPO, rel), src / rel)
    git = ["git", "-C", src, "-c", "user.name=t5lite", "-c", "user.email=t5lite@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "wheel test"]):
        _run(git + args, root)
    commit = _run(git + ["rev-parse", "HEAD"], root).strip()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          root / "dist", src], root)
    wheels = os.listdir(root / "dist")
    assert len(wheels) == 1 and wheels[0].startswith("t5lite-")
    bin_dir = _venv(root / "venv")
    _run([sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--no-deps", "--no-index", "-q",
          root / "dist" / wheels[0]], root)
    work = root / "work"
    work.mkdir()
    return work, bin_dir, src, commit


def test_installed_wheel_trains_infers_and_includes_shipped_recipes(built):
    work, bin_dir, _, commit = built
    module = _run([bin_dir / "python", "-c", "import t5lite; print(t5lite.__file__)"], work).strip()
    assert module.startswith(str(bin_dir.parent)), module  # the installed copy, not the repo
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert _run([bin_dir / "t5lite", "--version"], work).strip() == f"t5lite {version}"
    shipped = sorted(os.path.relpath(os.path.join(d, f), os.path.join(REPO, "experiments")).replace(os.sep, "/")
                     for d, _, files in os.walk(os.path.join(REPO, "experiments"))
                     for f in files if f.endswith((".gin", ".toml")))
    assert _run([bin_dir / "t5lite", "recipes", "--paths"], work).split() == shipped

    # A tiny train on a shipped recipe, named as in the repo and as in the recipes.
    _run([bin_dir / "t5lite", "train", "--gin_file=experiments/demo/pretrain.gin", "--gin_file=models/tiny.gin",
          "--model_dir=pretrain", "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2", "--gin.train.progress='off'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"], work)
    assert os.listdir(work / "pretrain" / "checkpoints") == ["2"]
    record = json.loads((work / "pretrain" / "provenance.json").read_text())
    assert (record["source"], record["version"], record["commit"]) == ("installed package", version, commit)
    assert record["versions"]["t5lite"] == version
    assert (work / "pretrain" / "operative_config.gin").read_text().startswith(
        f"# provenance: t5lite {version} installed in ")

    # infer from it.
    (work / "in.txt").write_text("translate English to Spanish: In the beginning.\n")
    _run([bin_dir / "t5lite", "infer", "--checkpoint", "pretrain", "--input", "in.txt", "--output", "out.jsonl",
          "--max_decode_length", "4", "--batch_size", "1", "--input_length", "32"], work)
    out = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines()]
    assert [o["input"] for o in out] == ["translate English to Spanish: In the beginning."]

    # A user's own gin file includes a shipped run file and model size.
    (work / "mine.gin").write_text("include 'demo/pretrain.gin'\ninclude 'models/tiny.gin'\nTRAIN_STEPS = 5\n")
    config = _run([bin_dir / "t5lite", "train", "--gin_file=mine.gin", "--model_dir=mine", "--print_config"], work)
    assert "T5Config.emb_dim = 64" in config and "TRAIN_STEPS = 5" in config


def test_editable_install_finds_the_recipes_in_experiments(built, tmp_path):
    _, _, src, _ = built
    bin_dir = _venv(tmp_path / "venv")
    _run([sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--no-deps", "--no-index",
          "--no-build-isolation", "-q", "-e", src], tmp_path)
    assert _run([bin_dir / "python", "-c", "from t5lite import gin_utils; print(gin_utils.RECIPES_DIR)"],
                tmp_path).strip() == str(src / "experiments")
    config = _run([bin_dir / "t5lite", "train", "--gin_file=models/tiny.gin", "--print_config"], tmp_path)
    assert "T5Config.emb_dim = 64" in config
