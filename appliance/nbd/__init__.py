"""The NBD server (docs/nbd.md): protocol, one session per connection, batched replies, the
listening server.
"""
