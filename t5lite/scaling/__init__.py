"""`t5lite sweep`: grids of ordinary training runs, ablations over seeds, scaling-law fits.

spec.py (what a sweep is: grid flags, sweep files, point names) -> sweep.py (plan each point,
train it in a subprocess, skip / resume / record failures) -> summary.py (tables, groups over
seeds, Welch's t-test) -> fit.py (L(N, D), L(N), L(D), bootstrap, compute-optimal) -> plots.py.
command.py holds what the CLI calls.
"""
