"""Overrides that make a pipeline run on the tiny offline suite take seconds (shared by tests)."""

FAST = [
    "suite=offline_tiny",
    "logger=disabled",
    "progress=false",
    "num_threads=1",
    "preferences.simplex_step=0.25",
    "preferences.dirichlet_n=12",
    "preferences.pairs=[[mnist,animals],[digits,faces]]",
]
