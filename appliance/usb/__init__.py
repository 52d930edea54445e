"""The USB side (docs/gadget.md): the configfs gadget, the kernel NBD device, UDC watch, the
host serial channel, and the host-side client `savepoint-host`.
"""
