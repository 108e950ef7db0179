"""The engine as a process: `server` (the ZMQ busy loop around any backend's core, a thin
shell) and `client` (launch an engine process, talk to it). Imports the backends; nothing
below imports it.
"""
