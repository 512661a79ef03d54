import pytest

from pttd.datadir import DataDir


class MemoryBlocks:
    """An in-memory block map for the pure tree algorithms."""

    def __init__(self):
        self.blocks: dict[bytes, bytes] = {}
        self.reads = 0

    def emit(self, address: bytes, block: bytes) -> None:
        self.blocks[address] = block

    def load(self, address: bytes):
        from protocol.tree import decode_node

        self.reads += 1
        return decode_node(self.blocks[address][1:])


@pytest.fixture
def mem():
    return MemoryBlocks()


@pytest.fixture
def datadir(tmp_path):
    dd = DataDir.init(str(tmp_path / "data"))
    yield dd
    dd.close()


@pytest.fixture
def repo(datadir):
    return datadir.repository()
