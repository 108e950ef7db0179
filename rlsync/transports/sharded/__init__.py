"""The sharded halves of the transports: each FSDP rank writes (ipc) or broadcasts
(broadcast) its own dim-0 rows, rank 0 runs the one-rank protocol. `dim0` says which rows a
rank holds; `channel` is how ranks coordinate; `ipc` and `buffer` extend the ipc sender
through its public hooks (`make_writer`, `BucketWriter`); `broadcast` and `broadcast_rows`
(both halves) the broadcast one. Imports the library only.
"""
