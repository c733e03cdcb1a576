"""Declared fields of `config.mesh` (see `vlp_jax.config_schema`; the readers are
parallel/mesh.py and parallel/sharding.py)."""
from vlp_jax.config_schema import ANY, Field, Map, Seq, declare

declare(
    "mesh", None,
    axes=Field(Map(int), {"data": -1}, doc="mesh axis sizes over ('data', 'fsdp', 'model'); "
                                          "one may be -1 (all remaining devices)"),
    rules=Field(Seq(Seq(ANY)), None, doc="(logical axis, mesh axis) pairs replacing "
                                        "parallel.sharding.DEFAULT_RULES"),
    num_devices=Field(int, None, doc="build the mesh over the first N devices (None: all)"),
)
