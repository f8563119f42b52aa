"""The asyncio driver: executes `_state`'s decisions on asyncio transports.

`connection` holds the HTTP/1.1 connection (an asyncio Protocol) and how it is opened,
written by hand; `request` the request path (acquire, open, exchange, stale retry, response
body), warm-up and preconnect, from which `_sync/request.py` is generated.
"""
