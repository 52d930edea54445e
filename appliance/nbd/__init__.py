"""The NBD server (docs/nbd.md): the wire format (protocol), the handshake, one session per
connection (the hot path) with its commands and batched replies, and the listening server.
"""
