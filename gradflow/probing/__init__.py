"""One step observed: the forward trace, the backward probe, the static description, and the measurements built on
them (packed-batch leak, checkpointing equivalence, real steps, probing under DDP/FSDP).

Named `probing`, not `probe`: `gradflow.probe` is the API function, and a subpackage of that name would replace it
as an attribute of `gradflow` the moment it was imported.
"""
