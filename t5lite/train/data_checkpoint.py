"""The data position in a training checkpoint: one JSON file per virtual data shard.

The input pipeline (t5lite/data/pipeline.py) splits the data into virtual shards whose order
does not depend on the process count; each process reads some of them. Saving one file per
shard (`data/shard_<v>.json`, written by whichever process reads that shard) rather than one per
process lets a checkpoint written by P processes resume on Q: each process loads the files of
the shards it now reads, and the next global batch is the one the P processes would have read.
"""

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import orbax.checkpoint as ocp
from etils import epath

from t5lite.errors import UserError

POSITION_FILE = "position.json"
FORMAT = "t5lite-data-shards-1"
log = logging.getLogger(__name__)


def _write_json(path: epath.Path, value) -> None:
    """Atomic: processes that read the same shard (tensor parallel across hosts) write equal files."""
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(value))
    tmp.rename(path)


DATA_SETTING_NAMES = {"task": "MIXTURE_OR_TASK_NAME", "sources": "the task's sources", "seed": "RANDOM_SEED",
                      "feature_lengths": "TASK_FEATURE_LENGTHS", "batch_size": "BATCH_SIZE",
                      "data_shards": "train.data_shards", "pack": "train.pack", "decoder_only": "train.decoder_only"}


def data_changes(stored: Optional[dict], current: Optional[dict]) -> str:
    """'RANDOM_SEED 0 -> 1, ...' for the data settings that differ; settings either side lacks are
    unknown, not different (checkpoints written before they were recorded)."""
    if not isinstance(stored, dict) or not current:
        return ""
    return ", ".join(f"{DATA_SETTING_NAMES.get(k, k)} {stored[k]!r} -> {current[k]!r}" for k in DATA_SETTING_NAMES
                     if k in stored and k in current and stored[k] != current[k])


def data_mismatch(step: int, directory: str, what: str) -> str:
    model_dir = os.path.dirname(directory)
    return (f"checkpoint step {step} in {directory} was saved with other data settings ({what}), so its data "
            f"position does not apply; resume with the old value(s), or keep the step and optimizer state and "
            f"start the new data from its beginning with --gin.train.reset_data=True, or start a new run from "
            f"these weights: t5lite finetune --init_checkpoint={model_dir} --model_dir=NEW_DIR")


class DataPositionMismatch(UserError):
    """The saved position is readable but belongs to another pipeline (another task, for instance)."""


class DataPositionHandler(ocp.CheckpointHandler):
    """Orbax handler: save writes this process's shard states; restore reads the shards the
    iterator reads now, whatever process wrote them."""

    def save(self, directory: epath.Path, args: "DataPositionSave") -> None:
        state = args.state
        for shard, shard_state in state["shards"].items():
            _write_json(directory / f"shard_{int(shard):05d}.json",
                        {"state": shard_state, "ended": int(shard) in set(state.get("ended", ()))})
        if args.primary:
            _write_json(directory / POSITION_FILE, {"format": FORMAT, "num_shards": state["num_shards"]})

    def restore(self, directory: epath.Path, args: "DataPositionRestore") -> Any:
        iterator = args.iterator
        current = iterator.get_state()
        position = directory / POSITION_FILE
        if not position.exists():
            if not list(directory.glob("process_*.json")):
                raise ValueError(f"{directory} holds no data position")
            # An older t5lite (one grain state per process) cannot place the shards: start over.
            log.warning("the checkpoint's data position is in an older format; the input pipeline restarts "
                        "from the beginning of the data")
            return iterator
        saved = json.loads(position.read_text())
        if saved.get("num_shards") != current["num_shards"]:
            raise DataPositionMismatch(f"{saved.get('num_shards')} data shards there, {current['num_shards']} here")
        shards, ended = {}, []
        for shard in current["shards"]:
            path = directory / f"shard_{int(shard):05d}.json"
            if not path.exists():
                raise ValueError(f"{path} is missing")
            record = json.loads(path.read_text())
            shards[shard] = record["state"]
            if record.get("ended"):
                ended.append(int(shard))
        try:
            iterator.set_state({"num_shards": current["num_shards"], "shards": shards, "ended": ended})
        except Exception as e:  # noqa: BLE001 - readable, but a position of another pipeline
            iterator.set_state(current)  # back to where it was: a caller may go on from the beginning
            raise DataPositionMismatch(f"{type(e).__name__}: {str(e).strip()[:120]}") from None
        return iterator

    def metadata(self, directory: epath.Path) -> Optional[Any]:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataPositionHandler, for_save=True)
@dataclasses.dataclass
class DataPositionSave(ocp.args.CheckpointArgs):
    state: dict  # the iterator's state, taken when the save starts
    primary: bool = True  # writes position.json


@ocp.args.register_with_handler(DataPositionHandler, for_restore=True)
@dataclasses.dataclass
class DataPositionRestore(ocp.args.CheckpointArgs):
    iterator: Any  # moved to the saved position
