# The front door: every target works from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PB := chat/v1
PROTO := proto/chat/v1/chat.proto
STAMP := $(VENV)/.installed
BUF := tools/node_modules/.bin/buf
NODE_TEST_DEPS := tests/node/node_modules/.installed
HOST ?= 127.0.0.1
PORT ?= 50051

.PHONY: all help proto run client admin test fuzz lint bench bench-bare clean

all: proto

## help: list the targets
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(PB)/.generated: $(PROTO) $(STAMP)
	rm -f $(PB)/*_pb2*.py $(PB)/*_pb2*.pyi
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. $(PROTO)
	touch $@

## proto: generate the public package chat.v1 (code and type stubs) from proto/chat/v1/chat.proto, as builds do
proto: $(PB)/.generated

## run: start the server on $(HOST):$(PORT) with the in-memory registry
run: proto
	$(BIN)/chat-server --host $(HOST) --port $(PORT)

## client: start the interactive client against $(HOST):$(PORT)
client: proto
	$(BIN)/chat --host $(HOST) --port $(PORT)

## admin: start the admin console against $(HOST):$(PORT)
admin: proto
	$(BIN)/chat-admin --host $(HOST) --port $(PORT)

$(BUF): tools/package.json tools/package-lock.json
	cd tools && npm ci --silent --no-audit --no-fund
	touch $@

$(NODE_TEST_DEPS): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --silent --no-audit --no-fund
	touch $@

## lint: ruff, mypy --strict and buf lint
lint: proto $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd proto && ../$(BUF) lint

## test: install everything, lint, and run the whole test suite, a file at a time in each of TEST_PROCESSES (2) processes
test: proto lint $(NODE_TEST_DEPS)
	PYTHONASYNCIODEBUG=1 $(BIN)/python -m pytest -n $(or $(TEST_PROCESSES),2) --dist loadfile $(PYTEST_ARGS)

## fuzz: the adversarial suite with many more cases and a fresh seed (FUZZ_CASES=N, FUZZ_SEED=N to replay one)
fuzz: proto
	FUZZ_CASES=$(or $(FUZZ_CASES),40000) FUZZ_SEED=$(or $(FUZZ_SEED),$(shell date +%s)) \
		$(BIN)/python -m pytest -o timeout=1800 tests/test_fuzz.py

## bench: the fan-out benchmark, a connection per member, each shape beside its bare floor (QUICK=1 small shapes, RUNS=3 medians, MULTIPLEXED=1 64 members per connection, STORE=nats or "memory nats", WORKERS=2 or "1 2")
bench: proto
	$(BIN)/python -m bench $(if $(QUICK),--quick,) $(if $(RUNS),--runs $(RUNS),) $(if $(MULTIPLEXED),--multiplexed,) \
		$(foreach store,$(STORE),--store $(store)) $(foreach workers,$(WORKERS),--workers $(workers))

## bench-bare: what a bare grpc.aio server spends per streamed write, by events per write, writes in flight and streams per connection
bench-bare: proto
	$(BIN)/python -m bench.bare

## clean: remove everything generated or installed
clean:
	rm -rf $(VENV) $(PB)/*_pb2*.py $(PB)/*_pb2*.pyi $(PB)/.generated dist tools/node_modules tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache
