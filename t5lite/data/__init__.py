"""Data: vocabularies, sources, preprocessors, tasks and the grain pipeline."""
