"""What crosses a process: every message as a typed dataclass (`protocol`), the one msgpack
codec (`codec`, no pickle), field annotations, the ZMQ RPC client (`rpc`), CURVE keys
(`auth`), endpoints and addresses. Open `protocol.py` first. Imports only torch and the
wire packages (pyzmq, msgpack); nothing of transports, trainers or engines.
"""
