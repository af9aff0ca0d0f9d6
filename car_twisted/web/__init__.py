"""
The sibling HTTP endpoint: ``/health``, ``/metrics`` and the dashboard
(``web.site``), who may use it (``web.access``), its WebSocket
(``web.ws``) and the service that listens (``web.service``).
"""
