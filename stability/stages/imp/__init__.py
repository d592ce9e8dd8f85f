"""Iterative magnitude pruning with rewinding, against random baselines."""
