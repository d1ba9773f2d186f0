"""The node settings of clusters whose few accounts write as fast as the nodes take them.

The benchmark's and the tests' workloads send hundreds of messages a second per
account, which the nodes' default ``send_rate`` (10 a second) would refuse
(pgbench, the benchmark's peer, meets no such limit either); nor do they want a
``write_rate``, nor a ``register_rate``: their accounts, up to one per client,
all register from one address. A test of a limit sets it over these. A module of
its own: the benchmark's lean load workers import it, and nothing else here.
"""

from __future__ import annotations

UNLIMITED: dict[str, object] = {"send_rate": 0, "write_rate": 0, "register_rate": 0}
