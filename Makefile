# Every target works on a fresh machine with only Python 3.11+ and make:
# the virtual environment is created and the project installed on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUPERVISORD := $(BIN)/supervisord -c supervisord.conf
SUPERVISORCTL := $(BIN)/supervisorctl -c supervisord.conf

.PHONY: install run up down status test test-quick check lint typecheck clean bench bench-quick chaos soak chaos-hosts soak-hosts certs-hosts install-hosts run-hosts up-hosts down-hosts status-hosts

# Besides the venv, the folder supervisord writes its own log and the nodes' logs
# to: `supervisord -c supervisord.conf` refuses to start without it, so it must exist
# right after the install. The node data dirs are not made here: each node creates
# its own, private (0700).
install: $(STAMP) var/log

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

var/log:
	mkdir -p var/log

run: install
	$(SUPERVISORD) -n

up: install
	$(SUPERVISORD)

# supervisorctl's shutdown returns before supervisord has stopped the nodes: wait for
# it to exit (it removes its pidfile), so that what follows `make down` (moving var/
# aside for a restore, say) never races a node still writing its files.
WAIT_EXITED = pid=$$(cat $(1) 2>/dev/null); waited=0; \
	while [ -n "$$pid" ] && kill -0 "$$pid" 2>/dev/null; do \
	  if [ $$waited -ge 600 ]; then echo "supervisord (pid $$pid) still runs after 60 s" >&2; exit 1; fi; \
	  sleep 0.1; waited=$$((waited + 1)); \
	done

down: install
	-$(SUPERVISORCTL) shutdown
	@$(call WAIT_EXITED,var/supervisord.pid)

status: install
	-$(SUPERVISORCTL) status
	$(BIN)/chatctl status

test: install
	$(BIN)/python -m pytest

test-quick: install
	$(BIN)/python -m pytest -m 'not cluster'

# The benchmark (ops/bench): its own 3-node cluster in a temp folder, a table on
# stdout, JSON under var/bench/. BENCH_ARGS passes options, e.g. BENCH_ARGS="--runs 5".
bench: install
	$(BIN)/python -m ops.bench $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m ops.bench --quick $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check service ops tests
	$(BIN)/ruff format --check service ops tests

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

# Fault injection against a three-node cluster of its own, then the history
# checker (ops/chaos/README.md). Exit status 1 on any violation; the seed and
# the fault schedule are printed so that a failure can be replayed:
#   make chaos CHAOS_SEED=42 CHAOS_DURATION=120
# Process faults and disk faults (a full disk, I/O errors, a damaged page):
# CHAOS_FAULTS=process keeps to crashes and freezes. CHAOS_ARGS passes more
# options (python -m ops.chaos --help).
CHAOS_DURATION ?= 600
CHAOS_SEED ?=
CHAOS_FAULTS ?= all
CHAOS_ARGS ?=
chaos: install
	$(BIN)/python -m ops.chaos --duration $(CHAOS_DURATION) --faults $(CHAOS_FAULTS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED)) $(CHAOS_ARGS)

# A long soak: the same, for half an hour, keeping its work folder under var/.
soak: install
	$(BIN)/python -m ops.chaos --duration 1800 --faults $(CHAOS_FAULTS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED)) --workdir var/soak-$$(date +%Y%m%d-%H%M%S) $(CHAOS_ARGS)

# The same two in the etcd arbiter mode, laid out as the rehearsal of several hosts
# (nodes on 127.0.0.11-13, etcd on 127.0.0.10): --faults all adds partitions (nft:
# run as root) and etcd freezes and restarts.
chaos-hosts: install
	$(BIN)/python -m ops.chaos --arbiter etcd --duration $(CHAOS_DURATION) --faults $(CHAOS_FAULTS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED)) $(CHAOS_ARGS)

soak-hosts: install
	$(BIN)/python -m ops.chaos --arbiter etcd --duration 1800 --faults $(CHAOS_FAULTS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED)) --workdir var/soak-hosts-$$(date +%Y%m%d-%H%M%S) $(CHAOS_ARGS)

# Certificates for the rehearsal of several hosts on one machine (README, Security:
# TLS): a CA and one certificate per node (127.0.0.11-13) and for etcd (127.0.0.10),
# 0600 in a 0700 folder. Existing ones are kept.
certs-hosts: install
	$(BIN)/python -m ops.hosts.certs var/hosts/tls

# The rehearsal of several hosts on one machine (README, Several hosts): one etcd
# member on 127.0.0.10:2379 and the nodes on 127.0.0.11-13:7001, TLS on, the arbiter
# in etcd, under ops/hosts/supervisord.conf, everything under var/hosts/. The first
# use installs the hosts extra (the etcd binary, cryptography), makes the
# certificates and var/hosts/log/ (supervisord's log folder must exist).
HOSTS_STAMP := $(VENV)/.installed-hosts
HOSTS_SUPERVISORD := $(BIN)/supervisord -c ops/hosts/supervisord.conf
HOSTS_SUPERVISORCTL := $(BIN)/supervisorctl -c ops/hosts/supervisord.conf
HOSTS_SERVERS := 127.0.0.11:7001,127.0.0.12:7001,127.0.0.13:7001

$(HOSTS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,hosts]'
	touch $(HOSTS_STAMP)

install-hosts: $(HOSTS_STAMP) var/hosts/log
	$(BIN)/python -m ops.hosts.certs var/hosts/tls

var/hosts/log:
	mkdir -p -m 700 var/hosts
	mkdir -p var/hosts/log

run-hosts: install-hosts
	$(HOSTS_SUPERVISORD) -n

up-hosts: install-hosts
	$(HOSTS_SUPERVISORD)

down-hosts: install
	-$(HOSTS_SUPERVISORCTL) shutdown
	@$(call WAIT_EXITED,var/hosts/supervisord.pid)

status-hosts: install
	-$(HOSTS_SUPERVISORCTL) status
	$(BIN)/chatctl --ca var/hosts/tls/ca.pem --servers $(HOSTS_SERVERS) status

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
