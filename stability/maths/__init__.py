"""Pure functions, no disk: interpolation and barriers, pruning, metrics, FLOP counts, health checks."""
