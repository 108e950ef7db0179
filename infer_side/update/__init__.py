"""The engine-agnostic weight update: the typed state machine (`update_machine`: validate
-> pause -> receive -> flush -> version -> resume), its job (`update_job`) and the narrow
interface every backend implements (`engine_api`). Imports the library only, no backend.
"""
