"""Architectures, their construction and initialization, and the model registry."""
