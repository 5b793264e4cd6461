"""The package version, importable from every tier."""

__version__ = "0.1.0"
