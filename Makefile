# HuleEdu interface tier. `make run` and `make test` work on a fresh machine with python3,
# java 17, mvn, make and node; everything else is installed into .venv and .tools.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := .tools/node_modules/.bin/buf
KAFKA_PORT ?= 19092
export KAFKA_PORT
ARGS ?=

.PHONY: run test install proto lint perf kafka-start kafka-stop cluster-start cluster-stop openapi clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

$(BUF):
	mkdir -p .tools
	cd .tools && npm install --silent --no-audit --no-fund @bufbuild/buf@1.75.0

RUN_ARGS ?=

## run: start the whole tier on its embedded defaults (RUN_ARGS: e.g. --kafka 127.0.0.1:19092)
run: install
	$(BIN)/huleedu devstack $(RUN_ARGS)

## test: the whole suite against a real Apache Kafka broker on loopback (stopped afterwards)
test: install
	@deploy/kafka/broker.sh fetch
	@deploy/kafka/broker.sh start
	@trap 'deploy/kafka/broker.sh stop' EXIT INT TERM; \
	  KAFKA_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) $(BIN)/pytest $(ARGS)

## proto: regenerate common/contracts from proto/
proto: install $(BUF)
	cd proto && ../$(BUF) lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m deploy.protogen

## openapi: export the gateway's OpenAPI 3.1 document to gateway/openapi.json
openapi: install
	$(BIN)/python -m deploy.openapi

## lint: ruff, mypy, bandit, buf lint
lint: install $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/bandit -q -ll -c pyproject.toml -r common gateway wsmanager aggregator deploy
	cd proto && ../$(BUF) lint

## perf: run the benchmarks (needs the broker for the Kafka ones); results in perf/results/
perf: install
	@deploy/kafka/broker.sh fetch
	@deploy/kafka/broker.sh start
	@trap 'deploy/kafka/broker.sh stop' EXIT INT TERM; \
	  export KAFKA_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT); \
	  $(BIN)/python -m perf $(ARGS)

kafka-start:
	@deploy/kafka/broker.sh fetch
	@deploy/kafka/broker.sh start

kafka-stop:
	@deploy/kafka/broker.sh stop

## cluster-start / cluster-stop: every service as its own process on a real broker
cluster-start: install
	@deploy/kafka/broker.sh fetch
	@deploy/local-cluster start

cluster-stop:
	@deploy/local-cluster stop

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache .hypothesis deploy/kafka/.cache deploy/kafka/.run
