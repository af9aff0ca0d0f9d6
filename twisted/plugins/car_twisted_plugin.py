"""The ``twist car`` dropin: names the tap module and nothing else."""

from twisted.application.service import ServiceMaker

car = ServiceMaker(
    "car-twisted",
    "car_twisted.tap",
    "The CAR agent daemon: JSON-RPC 2.0 over WebSocket (TCP and UNIX).",
    "car",
)
