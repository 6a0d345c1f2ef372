"""Shared by tests: overrides that make a pipeline run on the tiny offline suite take seconds,
and the paper-shaped columns of the collected tables (after the swept keys), spelled out here
as the spec rather than imported from pipeline.collect."""

FAST = [
    "suite=offline_tiny",
    "logger=disabled",
    "progress=false",
    "num_threads=1",
    "preferences.simplex_step=0.25",
    "preferences.dirichlet_n=12",
    "preferences.pairs=[[mnist,animals],[digits,faces]]",
]

TABLE1_COLUMNS = ["method", "merged", "equal", "priority", "one-hot", "expert"]
TABLE2_COLUMNS = ["method", "HV@3", "HV@all", "U@3", "U@all", "align@3", "align@all"]
