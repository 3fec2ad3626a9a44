"""Which code produced a run: git commit, dirty flag and a hash of the uncommitted changes.

`t5lite train` calls write(model_dir), which records the code t5lite is imported from in
MODEL_DIR/provenance.json. In a git checkout that is computed from git; on a TPU VM or GPU host
the launch scripts ship a packed tree (pack()) with no .git, whose provenance file, written when
it was packed, is read instead. An installed wheel records its version and the commit it was built from
(BUILD_FILE, written by setup.py when the wheel is built in a checkout). Standard library only: the launch scripts run
`python3 -m t5lite.provenance pack OUT.tar.gz` on a machine without jax.
"""

import argparse
import datetime
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import urllib.request
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from t5lite.errors import UserError
from t5lite.fileio import write_text_atomic

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the tree t5lite runs from
TREE_FILE = ".t5lite_tree.json"   # at the root of a packed tree: how it was packed
RUN_FILE = "provenance.json"      # in model_dir
BUILD_FILE = "_build_info.json"   # in an installed wheel's t5lite/: the checkout it was built from
INSTALLED = "installed package"
NOT_A_GIT_CHECKOUT = "not a git checkout"
# Never shipped or hashed, even when git does not ignore them: environments, outputs, caches.
EXCLUDED_DIRS = frozenset({".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", ".mypy_cache",
                           ".ruff_cache", ".ipynb_checkpoints", ".cache", ".eggs", "build", "dist"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".egg-info")
_VERSIONS_OF = ("jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "grain")


def excluded(path: str) -> bool:
    """Whether a tree-relative path is left out of the packed tree and of the diff hash."""
    parts = path.split("/")
    return (path == TREE_FILE or any(p in EXCLUDED_DIRS or p.endswith(EXCLUDED_SUFFIXES) for p in parts))


# --- the code: git checkout, packed tree, or neither ----------------------------------------------

def _git(root: str, *args: str) -> bytes:
    return subprocess.run(["git", "-C", root, *args], capture_output=True, check=True).stdout


def _git_paths(root: str, *args: str) -> List[str]:
    return [p for p in _git(root, *args, "-z").decode("utf-8", "surrogateescape").split("\0") if p]


def is_git_checkout(root: str) -> bool:
    """True when `root` is the top of a git work tree (not merely somewhere inside another repository)."""
    try:
        top = _git(root, "rev-parse", "--show-toplevel").decode().strip()
    except (OSError, subprocess.CalledProcessError):
        return False
    return os.path.realpath(top) == os.path.realpath(root)


def tree_files(root: str) -> List[str]:
    """The files a packed tree holds, relative to root: tracked and untracked-but-not-ignored ones
    (from git) or every file (not a checkout), without EXCLUDED_DIRS / suffixes."""
    if is_git_checkout(root):
        paths = _git_paths(root, "ls-files", "--cached", "--others", "--exclude-standard")
    else:
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not excluded(d))
            rel = os.path.relpath(dirpath, root)
            paths += [f if rel == "." else f"{rel}/{f}" for f in filenames]
    return sorted({p for p in paths if not excluded(p) and os.path.lexists(os.path.join(root, p))})


def _file_digest(root: str, path: str) -> bytes:
    """path, executable bit and content (or link target, or deletion) as one hashable record."""
    full = os.path.join(root, path)
    if os.path.islink(full):
        body, mode = b"link:" + os.readlink(full).encode(), "l"
    elif os.path.isfile(full):
        with open(full, "rb") as f:
            body = hashlib.sha256(f.read()).digest()
        mode = "x" if os.access(full, os.X_OK) else "-"
    else:
        body, mode = b"deleted", "d"
    return path.encode("utf-8", "surrogateescape") + b"\0" + mode.encode() + b"\0" + body + b"\n"


def checkout_provenance(root: str) -> Dict:
    """commit, dirty flag, changed / untracked files and `diff_sha256` of a git checkout.

    diff_sha256 hashes the path, executable bit and content of every file that differs from the
    commit (edits, deletions, untracked new files), so commit + hash pin the exact code; None when clean.
    """
    try:
        commit = _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}").decode().strip()
        modified = _git_paths(root, "diff", "HEAD", "--name-only", "--no-renames")
    except subprocess.CalledProcessError:  # no commit yet: everything tracked counts as changed
        commit, modified = None, _git_paths(root, "ls-files", "--cached")
    modified = sorted(p for p in set(modified) if not excluded(p))
    untracked = sorted(p for p in _git_paths(root, "ls-files", "--others", "--exclude-standard") if not excluded(p))
    changed = sorted(set(modified) | set(untracked))
    digest = hashlib.sha256(b"".join(_file_digest(root, p) for p in changed)).hexdigest() if changed else None
    return {"commit": commit, "dirty": bool(changed), "diff_sha256": digest, "modified": modified,
            "untracked": untracked}


def _read_json(path: str) -> Optional[Dict]:
    """The JSON object in `path`; None when there is none (a damaged file is reported, never fatal)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError) as e:
        logging.warning("ignoring unreadable %s (%s)", path, e)
        return None
    return found if isinstance(found, dict) else None


def build_info(root: str) -> Optional[Dict]:
    """What setup.py writes into a wheel as t5lite/BUILD_FILE: the checkout's commit and changes; None outside one."""
    if not is_git_checkout(root):
        return None
    info = checkout_provenance(root)
    return {"commit": info["commit"], "dirty": info["dirty"], "diff_sha256": info["diff_sha256"], "built_at": _now()}


def _installed_version(root: str) -> Optional[str]:
    """t5lite's version when `root` holds an installed (not editable) t5lite distribution, else None."""
    try:
        dist = importlib.metadata.distribution("t5lite")
    except importlib.metadata.PackageNotFoundError:
        return None
    ours = os.path.realpath(os.path.join(root, "t5lite", "__init__.py"))
    return dist.version if os.path.realpath(str(dist.locate_file("t5lite/__init__.py"))) == ours else None


def code_provenance(root: str = PACKAGE_ROOT) -> Dict:
    """What code `root` holds: from git in a checkout, else from a packed tree's TREE_FILE, else an installed
    wheel's version and build commit, else unknown."""
    if is_git_checkout(root):
        return {"source": "git checkout", "tree": root, **checkout_provenance(root)}
    packed = _read_json(os.path.join(root, TREE_FILE))
    if packed is not None:
        return {**packed, "source": "synced tree", "tree": root}
    version = _installed_version(root)
    if version is not None:
        built = _read_json(os.path.join(root, "t5lite", BUILD_FILE)) or {}
        return {"source": INSTALLED, "tree": root, "version": version,
                "commit": built.get("commit") or f"unknown (t5lite {version} built outside a git checkout)",
                "dirty": built.get("dirty"), "diff_sha256": built.get("diff_sha256"), "built_at": built.get("built_at")}
    return {"source": NOT_A_GIT_CHECKOUT, "tree": root, "commit": NOT_A_GIT_CHECKOUT, "dirty": None,
            "diff_sha256": None}


def pack(out_path: str, root: str = PACKAGE_ROOT) -> Dict:
    """Writes the working tree (tree_files) and its provenance (TREE_FILE) to a .tar.gz; returns the provenance."""
    root = os.path.abspath(root)
    files = tree_files(root)
    if not files:
        raise UserError(f"{root} holds no files to pack; run from a t5lite checkout")
    info = {k: v for k, v in code_provenance(root).items() if k not in ("source", "tree")}
    info.update(packed_at=_now(), packed_on=socket.gethostname(), packed_from=root, files=len(files))
    payload = json.dumps(info, indent=2).encode()
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in files:
                tar.add(os.path.join(root, path), arcname=path, recursive=False)
            entry = tarfile.TarInfo(TREE_FILE)
            entry.size, entry.mtime, entry.mode = len(payload), int(datetime.datetime.now().timestamp()), 0o644
            tar.addfile(entry, io.BytesIO(payload))
        os.replace(tmp, out_path)
    except OSError as e:
        raise UserError(f"cannot write {out_path}: {e.strerror}; pick a writable path") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return info


# --- the processes: which one writes, and on which hosts the run is ---------------------------------

def _gce_metadata(key: str) -> Optional[str]:
    """A Cloud TPU VM's instance attribute (what jax reads to find the pod's workers); None elsewhere."""
    request = urllib.request.Request(
        f"http://metadata.google.internal/computeMetadata/v1/instance/attributes/{key}",
        headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def process_identity(env: Mapping[str, str] = os.environ,
                     metadata: Callable[[str], Optional[str]] = _gce_metadata) -> Tuple[int, int, Optional[List[str]]]:
    """(process index, process count, host names or None) from the launcher's environment, before jax starts.

    Mirrors what jax.distributed.initialize auto-detects: explicit JAX_* variables (launch/gpu_multihost.sh),
    SLURM, Open MPI, PMI, GKE TPU, and a Cloud TPU VM's metadata when T5LITE_DISTRIBUTED=1 (launch/tpu_vm.sh).
    """
    index, count, hosts = 0, 1, None
    for index_var, count_var in (("JAX_PROCESS_ID", "JAX_NUM_PROCESSES"), ("SLURM_PROCID", "SLURM_NTASKS"),
                                 ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if env.get(index_var) and env.get(count_var):
            index, count = int(env[index_var]), int(env[count_var])
            break
    else:
        if env.get("TPU_WORKER_ID") and env.get("TPU_WORKER_HOSTNAMES"):
            hosts = env["TPU_WORKER_HOSTNAMES"].split(",")
            index, count = int(env["TPU_WORKER_ID"]), len(hosts)
        elif env.get("T5LITE_DISTRIBUTED") == "1" and (worker := metadata("agent-worker-number")) is not None:
            hosts = [w.split(":")[-1] for w in (metadata("worker-network-endpoints") or "").split(",") if w]
            index, count = int(worker), max(len(hosts), 1)
    if env.get("MEGASCALE_SLICE_ID", "0") not in ("", "0"):  # multislice: only slice 0's worker 0 writes
        index = max(index, 1)
    if env.get("T5LITE_HOSTS"):  # set by launch/gpu_multihost.sh
        hosts = env["T5LITE_HOSTS"].split()
    elif env.get("SLURM_JOB_NODELIST") and hosts is None:
        hosts = [env["SLURM_JOB_NODELIST"]]  # SLURM's compressed notation, e.g. node[01-04]
    return index, count, hosts


# --- the record in model_dir -------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _versions() -> Dict[str, str]:
    import t5lite
    found = {"python": sys.version.split()[0], "t5lite": t5lite.__version__}
    for name in _VERSIONS_OF:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def summary_line(record: Mapping) -> str:
    """One gin comment line naming the code and the hosts (heads operative_config.gin)."""
    if record["source"] == NOT_A_GIT_CHECKOUT:
        code = f"code of unknown version ({NOT_A_GIT_CHECKOUT}: {record['tree']})"
    elif record["source"] == INSTALLED:
        changes = (f" with uncommitted changes, diff sha256 {record['diff_sha256']}" if record["dirty"] else
                   " (clean)" if record["dirty"] is False else "")
        code = f"t5lite {record['version']} installed in {record['tree']}, built from commit {record['commit']}{changes}"
    else:
        changes = f"uncommitted changes, diff sha256 {record['diff_sha256']}" if record["dirty"] else "clean"
        code = f"commit {record['commit']} ({changes}) from the {record['source']} {record['tree']}"
    if record.get("versions", {}).get("t5lite") and record["source"] != INSTALLED:
        code = f"{code}, t5lite {record['versions']['t5lite']}"
    processes = f"{record['process_count']} process{'es' if record['process_count'] > 1 else ''}"
    hosts = ", ".join(record["hosts"]) if record["hosts"] else f"{record['hostname']} and others"
    return f"# provenance: {code}; {processes} on {hosts}; see {RUN_FILE}\n"


def write(model_dir: str, process_index: Optional[int] = None, process_count: Optional[int] = None,
          hosts: Optional[List[str]] = None, root: str = PACKAGE_ROOT) -> str:
    """Records the code and hosts of this run in model_dir/provenance.json (process 0 only); returns the summary line.

    Earlier starts of the same model_dir (a resumed run) stay in `earlier_starts`, and a resume with
    different code is logged as a warning, so a result stays traceable to every code that produced it.
    """
    if process_index is None or process_count is None:
        env_index, env_count, env_hosts = process_identity()
        process_index = env_index if process_index is None else process_index
        process_count, hosts = (env_count if process_count is None else process_count), hosts or env_hosts
    hostname = socket.gethostname()
    record = {**code_provenance(root), "hostname": hostname,
              "hosts": hosts or ([hostname] if process_count == 1 else None), "process_count": process_count,
              "started_at": _now(), "argv": sys.argv, "versions": _versions()}
    line = summary_line(record)
    if process_index != 0:
        return line
    path = os.path.join(model_dir, RUN_FILE)
    earlier = []
    previous = _read_json(path)
    if previous is not None:
        earlier = previous.pop("earlier_starts", []) + [previous]
        if (previous.get("commit"), previous.get("diff_sha256")) != (record["commit"], record["diff_sha256"]):
            logging.warning("%s was started with other code (commit %s, diff %s); both are kept in %s",
                            model_dir, previous.get("commit"), previous.get("diff_sha256"), path)
    record["earlier_starts"] = earlier
    write_text_atomic(path, json.dumps(record, indent=2))
    return line


# --- `python3 -m t5lite.provenance pack OUT | show` (used by launch/*.sh) ------------------------------

def _describe(info: Mapping) -> str:
    state = ("clean" if not info.get("dirty") else
             f"{len(info.get('modified', []))} modified, {len(info.get('untracked', []))} untracked file(s)")
    return f"commit {info.get('commit')}, {state}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m t5lite.provenance", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="pack the working tree and its provenance into a .tar.gz")
    p.add_argument("out", help="the .tar.gz to write")
    p.add_argument("--root", default=PACKAGE_ROOT, help="the tree to pack (default: the one t5lite runs from)")
    s = commands.add_parser("show", help="print the provenance a run started here would record")
    s.add_argument("--root", default=PACKAGE_ROOT)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            info = pack(args.out, args.root)
            size = os.path.getsize(args.out) / 2**20
            print(f"packed {info['files']} files of {args.root} ({_describe(info)}) into {args.out}, {size:.1f} MiB",
                  file=sys.stderr)
            if size > 200:
                print(f"warning: the packed tree is {size:.0f} MiB; .gitignore large data or outputs to ship less",
                      file=sys.stderr)
        else:
            print(json.dumps(code_provenance(args.root), indent=2))
    except UserError as e:
        print(f"t5lite: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
