import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def reactor():
    from twisted.internet import reactor as global_reactor

    return global_reactor
