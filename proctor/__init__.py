"""Shared core of the proctoring service: settings, contracts, command line."""

__version__ = "0.1.0"
