"""The local-cluster harness: real node processes on this machine, for whoever needs them.

The tests (``tests/``), the benchmark (``ops/bench``) and the chaos tool
(``ops/chaos``) start, crash, freeze and observe nodes through this package
only, so that "the agreed primary", "converged" and "the same tables" mean
one thing everywhere:

    nodes.py      NodeProcess and Cluster: processes, folders, configs, logs, waits
    agreement.py  the rules over status views: agreed primary, position, sync set
    probe.py      the ``status`` op over a bare socket (not the client library)
    waiting.py    polling with a deadline whose failure says what never happened
    ports.py      free ports on a node's own address
    logs.py       node log events; at most one primary per epoch (R1)
    history.py    the client operations of a workload and how each ended
    scrape.py     a node's Prometheus metrics, as a monitoring system reads them
    limits.py     the settings that lift the per-account and per-address limits
"""
