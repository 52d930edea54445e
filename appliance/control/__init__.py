"""The control path (docs/controls.md): command vocabulary, the bus, its policy and restore
policies, what a SAVE waits for, the local control socket.
"""
