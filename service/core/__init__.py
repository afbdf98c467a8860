"""The process layout `escort serve` runs: a supervisor, one engine core process that owns the
GPU and the batchers, and several HTTP worker processes that parse, preprocess and answer.

Rows travel from a worker to the engine through shared memory (`arena`), never pickled; the
pipes between the processes carry only small messages (`messages`). See docs/service.md.
"""
