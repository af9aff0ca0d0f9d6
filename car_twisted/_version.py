"""The package version, kept apart so setup.py can read it without imports."""

__version__ = "0.1.0"

# Wire protocol versions server.handshake accepts (car-runtime 0.58.0 speaks 3).
SUPPORTED_PROTOCOL_VERSIONS = (2, 3)
