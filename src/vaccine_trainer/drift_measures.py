"""The drift measures `AlignmentDriftCallback` logs beside the absolute drift, with their column titles.

One table for the reports' columns, the grid summary's figures and the recomputed-drift file, kept in a
module without heavy imports so that `vaccine-trainer grid` can read it without loading torch.
"""

DRIFT_MEASURES = {
    "drift_fraction": "Drift fraction",
    "median_token_drift": "Median token drift",
    "drift_excluding_first_token": "Drift excluding first token",
}
"""Logged as `alignment/<name>`, next to `alignment/drift`."""
