"""The thread driver: executes `_state`'s decisions on blocking sockets.

`connection` holds the HTTP/1.1 connection (a blocking socket) and how it is opened;
`request` the request path (acquire, open, exchange, stale retry), warm-up and preconnect.
"""
