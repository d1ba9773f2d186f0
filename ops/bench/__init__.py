"""The benchmark of SPEC section 9: a 3-node cluster against one plain SQLite file.

    python -m ops.bench [--quick] [--runs N] [--json PATH] [--target HOST:PORT,...]
    make bench / make bench-quick

What it measures, and why this way (details in each module and in README.md
beside this file):

* durable replicated ``send`` throughput and latency p50/p99 at 1, 8, 32 and
  64 concurrent clients (``load.py``: the load generator runs in its own
  processes and reports its CPU, so a saturated generator is visible);
* failover: SIGKILL of the primary to the first acknowledged write after it
  (``failover.py``);
* catch-up of a backup that missed N sends, from the log and by snapshot
  (``catchup.py``);
* memory per node and the time to start a stopped cluster, with many
  messages stored (``bigstate.py``);
* in the same run, the same rows in one plain SQLite file with the same
  durability (``baseline.py``), so every figure is also a ratio that holds
  on any machine (``report.py``).

The benchmark starts its own nodes (the local-cluster harness, ``ops/cluster``)
in a temp folder, as subprocesses it can SIGKILL; with ``--target`` it measures a running
cluster's throughput and latency instead.
"""
