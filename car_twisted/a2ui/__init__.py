"""
A2UI v0.9 surfaces behind ``a2ui.*``: the component catalog the daemon
advertises (``catalog``), the validated, atomic surface store
(``store``) and the scanner that finds A2UI messages inside A2A payloads
(``ingest``).  Pure logic: no I/O, only an injected clock.
"""
