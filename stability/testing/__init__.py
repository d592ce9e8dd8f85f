"""Plain one-model-at-a-time oracles that the tests and benchmarks hold the fast paths against."""
