"""STRATO's search: space and costs, SQLite archive, surrogate, masked environment, search loop.

See ``docs/strato.md`` for the design and its reasoning; the method that runs it inside
a training run is :class:`strato_peft.methods.strato.StratoMethod`.
"""
