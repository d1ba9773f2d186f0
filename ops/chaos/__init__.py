"""Fault injection and a history checker for the replicated chat service (SPEC section 8).

``python -m ops.chaos --duration SECONDS --seed N`` starts a three-node cluster
(or targets one under supervisord), runs a concurrent workload through the
client library while a nemesis crashes, freezes and restarts nodes on a
schedule drawn from the seed, then heals the cluster and checks everything
the clients were told against what every node holds. The design, module by
module, is in ``README.md`` beside this file.
"""
