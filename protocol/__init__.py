"""pttd's formats, sans-IO: hashing, canonical encoding, tree nodes, chunking, commits.

Nothing in this package touches a socket, a thread or the disk, so that a second
implementation can be written from it and docs/repository.md alone.
"""
