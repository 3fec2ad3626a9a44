"""t5lite/provenance.py: the diff hash against its definition, packing, process identity, provenance.json."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile

import pytest

from t5lite import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def make_repo(path, files):
    """A git repository at `path` with `files` ({relative path: text}) committed."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    git(path, "config", "user.email", "t@example.com")
    git(path, "config", "user.name", "t")
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "repo", {"pkg/model.py": "x = 1\n", "README.md": "hi\n", ".gitignore": "*.secret\n"})


def reference_diff_sha256(repo, changed):
    """The documented definition, written out: sha256 over (path, mode, sha256(content)) of each changed file."""
    records = b""
    for path in sorted(changed):
        full = repo / path
        if full.exists():
            mode = "x" if os.access(full, os.X_OK) else "-"
            body = hashlib.sha256(full.read_bytes()).digest()
        else:
            mode, body = "d", b"deleted"
        records += path.encode() + b"\0" + mode.encode() + b"\0" + body + b"\n"
    return hashlib.sha256(records).hexdigest()


def test_clean_checkout_has_commit_and_no_diff(repo):
    info = provenance.checkout_provenance(str(repo))
    assert info == {"commit": git(repo, "rev-parse", "HEAD").strip(), "dirty": False, "diff_sha256": None,
                    "modified": [], "untracked": []}


def test_diff_hash_follows_every_uncommitted_change_and_nothing_else(repo):
    (repo / "pkg/model.py").write_text("x = 2\n")
    (repo / "pkg/new_layer.py").write_text("y = 3\n")
    (repo / "notes.secret").write_text("ignored by .gitignore\n")
    (repo / "pkg/__pycache__").mkdir()
    (repo / "pkg/__pycache__/model.cpython-311.pyc").write_bytes(b"\0")  # not ignored by git, still excluded
    info = provenance.checkout_provenance(str(repo))
    assert info["dirty"] and info["modified"] == ["pkg/model.py"] and info["untracked"] == ["pkg/new_layer.py"]
    assert info["diff_sha256"] == reference_diff_sha256(repo, ["pkg/model.py", "pkg/new_layer.py"])

    first = info["diff_sha256"]
    (repo / "pkg/model.py").write_text("x = 2\n")  # rewritten, same content: same hash
    assert provenance.checkout_provenance(str(repo))["diff_sha256"] == first
    (repo / "pkg/new_layer.py").write_text("y = 4\n")
    assert provenance.checkout_provenance(str(repo))["diff_sha256"] not in (first, None)
    (repo / "pkg/new_layer.py").write_text("y = 3\n")
    os.chmod(repo / "pkg/model.py", 0o755)
    assert provenance.checkout_provenance(str(repo))["diff_sha256"] != first

    os.chmod(repo / "pkg/model.py", 0o644)
    os.remove(repo / "pkg/new_layer.py")
    git(repo, "checkout", "--", "pkg/model.py")
    assert provenance.checkout_provenance(str(repo))["dirty"] is False


def test_a_deleted_file_counts_as_a_change(repo):
    os.remove(repo / "README.md")
    info = provenance.checkout_provenance(str(repo))
    assert info["modified"] == ["README.md"]
    assert info["diff_sha256"] == reference_diff_sha256(repo, ["README.md"])


def test_pack_of_a_tree_without_git_keeps_files_and_says_so(tmp_path):
    tree = tmp_path / "tree"
    for name in ("pkg/model.py", ".venv/bin/python", "runs/a/metrics.jsonl", "pkg/__pycache__/m.pyc", "data.txt"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(name)
    info = provenance.pack(str(tmp_path / "t.tar.gz"), str(tree))
    with tarfile.open(tmp_path / "t.tar.gz") as tar:
        names = sorted(tar.getnames())
        packed = json.load(tar.extractfile(provenance.TREE_FILE))
    assert names == sorted([provenance.TREE_FILE, "data.txt", "pkg/model.py"])
    assert packed == info and info["commit"] == provenance.NOT_A_GIT_CHECKOUT and info["files"] == 2
    assert provenance.code_provenance(str(tree))["source"] == provenance.NOT_A_GIT_CHECKOUT


def test_pack_errors_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "t5lite.provenance", "pack", str(tmp_path / "no/dir/t.tar.gz"),
                          "--root", ROOT], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.startswith("t5lite: error: cannot write") and run.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "no")


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, None)),
    ({"JAX_PROCESS_ID": "1", "JAX_NUM_PROCESSES": "2", "T5LITE_HOSTS": "gpu0 gpu1"}, (1, 2, ["gpu0", "gpu1"])),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "node[01-04]"}, (0, 4, ["node[01-04]"])),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8"}, (3, 8, None)),
    ({"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, (0, 4, ["w0", "w1", "w2", "w3"])),
    ({"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "w0,w1", "MEGASCALE_SLICE_ID": "1"}, (1, 2, ["w0", "w1"])),
])
def test_process_identity_from_the_launcher_environment(env, expected):
    def no_metadata(key):
        raise AssertionError("metadata is only read on a TPU VM launched with T5LITE_DISTRIBUTED=1")
    assert provenance.process_identity(env, no_metadata) == expected


def test_process_identity_on_a_tpu_vm_reads_the_metadata_jax_reads():
    metadata = {"agent-worker-number": "2",
                "worker-network-endpoints": "unknown:unknown:10.0.0.2,unknown:unknown:10.0.0.3,"
                                            "unknown:unknown:10.0.0.4,unknown:unknown:10.0.0.5"}
    assert provenance.process_identity({"T5LITE_DISTRIBUTED": "1"}, metadata.get) == (
        2, 4, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"])
    assert provenance.process_identity({"T5LITE_DISTRIBUTED": "1"}, lambda key: None) == (0, 1, None)


def test_only_process_zero_writes_and_a_resume_keeps_earlier_starts(repo, tmp_path, caplog):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    line = provenance.write(str(model_dir), process_index=1, process_count=2, root=str(repo))
    assert not os.listdir(model_dir) and line.startswith("# provenance: commit ")

    provenance.write(str(model_dir), process_index=0, process_count=2, hosts=["h0", "h1"], root=str(repo))
    first = json.loads((model_dir / provenance.RUN_FILE).read_text())
    assert first["hosts"] == ["h0", "h1"] and first["process_count"] == 2 and first["dirty"] is False
    assert first["earlier_starts"] == [] and "jax" in first["versions"]

    (repo / "pkg/model.py").write_text("x = 5\n")
    with caplog.at_level(logging.WARNING):
        line = provenance.write(str(model_dir), process_index=0, process_count=1, root=str(repo))
    again = json.loads((model_dir / provenance.RUN_FILE).read_text())
    assert again["dirty"] and again["diff_sha256"] in line and "other code" in caplog.text
    assert [e["started_at"] for e in again["earlier_starts"]] == [first["started_at"]]
    assert again["earlier_starts"][0]["diff_sha256"] is None


def test_a_damaged_provenance_file_is_replaced_not_fatal(repo, tmp_path):
    (tmp_path / provenance.RUN_FILE).write_text('{"commit": "abc", "dirty"')  # a run killed mid-write elsewhere
    provenance.write(str(tmp_path), process_index=0, process_count=1, root=str(repo))
    record = json.loads((tmp_path / provenance.RUN_FILE).read_text())
    assert record["commit"] == git(repo, "rev-parse", "HEAD").strip() and record["earlier_starts"] == []
