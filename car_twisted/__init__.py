"""
car-twisted: the CAR agent daemon's session core on Twisted and Autobahn.

The embedding API: build a ``ServerState`` from a ``ServerStateConfig``,
serve it with ``make_car_service`` (or hand ``CarServerFactory`` to any
endpoint), and add JSON-RPC methods with ``MethodSpec`` /
``ServerState.register_method``.
"""

from car_twisted._version import __version__
from car_twisted.config import AdapterRegistration, ServerStateConfig
from car_twisted.errors import InvalidParams, RpcError
from car_twisted.paths import CarPaths
from car_twisted.rpc.registry import MethodSpec, StaticMethods
from car_twisted.service import make_car_service
from car_twisted.session import ClientSession
from car_twisted.state import ServerState
from car_twisted.ws.channel import WsChannel
from car_twisted.ws.protocol import CarServerFactory

__all__ = [
    "__version__",
    "AdapterRegistration",
    "CarPaths",
    "CarServerFactory",
    "ClientSession",
    "InvalidParams",
    "MethodSpec",
    "RpcError",
    "ServerState",
    "ServerStateConfig",
    "StaticMethods",
    "WsChannel",
    "make_car_service",
]
