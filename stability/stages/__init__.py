"""The stages a user runs: trunk, siblings, instability sweeps, Hessian tracks, IMP, early-bird, connect."""
