"""`t5lite compile`: ahead-of-time compilation of a run for a TPU topology (aot.py) and what the compiled
programs do, read from their HLO and jaxpr (program_stats.py)."""
