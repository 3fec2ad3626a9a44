"""Rewrites the golden parameter-shape files. Run only for an intended checkpoint-layout change:

    .venv/bin/python tests/golden/regenerate.py
"""

import json
import os

from t5lite.model import PRESETS, abstract_params, get_config, param_shapes

HERE = os.path.dirname(os.path.abspath(__file__))


def golden_shapes(name: str, **overrides) -> dict:
    return dict(sorted(param_shapes(abstract_params(get_config(name, **overrides))).items()))


def write(filename: str, shapes: dict) -> None:
    lines = [f"  {json.dumps(path)}: {json.dumps(shape)}" for path, shape in shapes.items()]
    with open(os.path.join(HERE, filename), "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    for name in PRESETS:
        write(f"{name}.json", golden_shapes(name))
    write("tiny_scanned.json", golden_shapes("tiny", scan_layers=True))
    write("tiny_split.json", golden_shapes("tiny", attention_layout="split"))  # checkpoints saved before joined
