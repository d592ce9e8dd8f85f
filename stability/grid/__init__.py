"""Grids of runs: the plan (units from a TOML grid), running one unit, executors (local, Ray, Slurm), status."""
