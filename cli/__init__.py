"""Command-line front ends: ``pttd`` and ``pttctl``."""
