"""Packaging that pyproject.toml alone cannot say.

- experiments/ ships inside the package as t5lite.recipes: the repo keeps one copy of the recipes
  (experiments/, where people read and edit them), and a wheel maps that directory onto t5lite/recipes, so
  `--gin_file=models/tiny.gin` and `include 'models/tiny.gin'` work from any directory after `pip install`
  (t5lite/gin_utils.py finds them either way).
- A wheel built in a git checkout carries t5lite/_build_info.json (the commit and any uncommitted changes),
  which every run of the installed package records in its model_dir's provenance.json.
Everything else is in pyproject.toml.
"""

import json
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
EXPERIMENTS = os.path.join(HERE, "experiments")
# Each folder of experiments/ is a data-only package (its *.gin / *.toml are package data, pyproject.toml).
RECIPES = ["t5lite.recipes"] + sorted(
    "t5lite.recipes." + os.path.relpath(d, EXPERIMENTS).replace(os.sep, ".") for d, _, _ in os.walk(EXPERIMENTS)
    if d != EXPERIMENTS and not os.path.basename(d).startswith((".", "__")))


class BuildPyWithCommit(build_py):
    """build_py, then t5lite/_build_info.json in the built tree (not in an editable install: it reads git)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        sys.path.insert(0, HERE)  # t5lite.provenance is standard library only
        from t5lite import provenance
        info = provenance.build_info(HERE)
        if info is not None:
            with open(os.path.join(self.build_lib, "t5lite", provenance.BUILD_FILE), "w") as f:
                json.dump(info, f, indent=2)


setup(
    packages=find_packages(include=["t5lite", "t5lite.*"]) + RECIPES,
    package_dir={"t5lite.recipes": "experiments"},
    cmdclass={"build_py": BuildPyWithCommit},
)
