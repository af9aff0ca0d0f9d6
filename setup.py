"""Packaging for car-twisted: the CAR daemon's session core on Twisted."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"',
    (HERE / "car_twisted" / "_version.py").read_text(),
    re.M,
).group(1)

setup(
    name="car-twisted",
    version=VERSION,
    description="The CAR agent daemon's session core as a Twisted plugin (twist car).",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # "twisted.plugins" is listed explicitly (and has no __init__.py) so the
    # dropin lands inside Twisted's plugin package without shadowing it.
    packages=find_packages(include=["car_twisted", "car_twisted.*"]) + ["twisted.plugins"],
    package_data={"car_twisted": ["py.typed"], "car_twisted.web": ["static/*"]},
    exclude_package_data={"twisted.plugins": ["dropin.cache"]},
    install_requires=[
        "twisted>=24.7,<27",
        "autobahn>=24.4,<27",
        "zope.interface>=6.0,<9",
        "attrs>=23.1,<27",
        "orjson>=3.9,<4",
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",
        "treq>=23.11,<27",
        "prometheus-client>=0.20,<1",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-twisted>=1.14,<2",
            "hypothesis>=6.100,<7",
            "selenium>=4.20,<5",
            "websockets>=12,<18",
        ],
        "interop": ["car-runtime==0.58.0"],
        "bench": ["websockets>=12,<18", "uvloop>=0.21,<0.24; sys_platform != 'win32'"],
        "voice": ["pocketsphinx>=5.0,<6"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
