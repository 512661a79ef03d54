"""pttd: the daemon, its store and repositories."""

__version__ = "0.1.0"
