"""The asyncio driver: executes `_state`'s decisions on asyncio transports.

`connection` holds the HTTP/1.1 connection (an asyncio Protocol) and how it is opened;
`request` the request path (acquire, open, exchange, stale retry), warm-up and preconnect.
"""
