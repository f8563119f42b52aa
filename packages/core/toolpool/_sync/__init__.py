"""The thread driver: executes `_state`'s decisions on blocking sockets.

`connection` holds the HTTP/1.1 connection (a blocking socket) and how it is opened,
written by hand; `request` is generated from `_async/request.py` (tools/unasync.py).
"""
