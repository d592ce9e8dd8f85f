"""The package version (a leaf, so that the run store can record it without importing the package face)."""
__version__ = "0.1.0"
