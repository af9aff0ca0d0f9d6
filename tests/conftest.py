import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def reactor():
    from twisted.internet import reactor as global_reactor

    return global_reactor


@pytest.fixture(scope="session")
def other_user():
    """
    A second, real Unix account (another local user), made for the run and
    removed after it.  Creating one needs root; CI runs as root.
    """
    import os
    import pwd
    import shutil
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("creating a second Unix user needs root (CI runs as root)")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    name = f"carprobe{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
