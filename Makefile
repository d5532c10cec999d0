# The two commands: `make run` (the whole system, embedded Valkey + Kafka) and `make test` (the whole suite).
# Both create or update .venv first; nothing else is installed by hand.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# the broker's version is written once, in infra/kafka/pom.xml (hbreg reads it there too)
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' infra/kafka/pom.xml)
KAFKA_JAR := .cache/kafka/$(KAFKA_VERSION)/libs/kafka_2.13-$(KAFKA_VERSION).jar

.PHONY: install run test unit lint proto bench clean kafka-jars alerting-tools browser-tools vendor toxiproxy

install: $(VENV)/.installed kafka-jars alerting-tools toxiproxy

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server]'
	@touch $@

# The real Apache Kafka broker (KRaft) from Maven Central, fetched once into an ignored cache folder.
kafka-jars:
	@if [ -f $(KAFKA_JAR) ]; then :; \
	elif command -v java >/dev/null && command -v mvn >/dev/null; then \
		echo "fetching Apache Kafka $(KAFKA_VERSION) jars with Maven into .cache/kafka/$(KAFKA_VERSION)/libs"; \
		mvn -q -B -Dstyle.color=never -f infra/kafka/pom.xml dependency:copy-dependencies \
			-DoutputDirectory=$(CURDIR)/.cache/kafka/$(KAFKA_VERSION)/libs -DincludeScope=runtime \
			-Dkafka.version=$(KAFKA_VERSION) || exit 1; \
	else \
		echo "Java 17 or Maven not found: hbreg up will use the Tansu fallback broker (the tests need Kafka)"; \
	fi

# Alertmanager, amtool and promtool from Debian's packages: the embedded alerts of `hbreg up`, and the tests
alerting-tools:
	@if command -v prometheus-alertmanager >/dev/null && command -v amtool >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's prometheus-alertmanager and prometheus (Alertmanager, amtool, promtool)"; \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			prometheus-alertmanager prometheus >/dev/null; } || \
			echo "could not install them: hbreg up runs without alerts (the tests need them)"; \
	else \
		echo "Alertmanager, amtool or promtool not found (not root, or no apt-get): hbreg up runs without alerts"; \
	fi

# Toxiproxy, the TCP fault proxy of `hbreg chaos`, built from its Go module once into an ignored cache folder
TOXIPROXY_VERSION := v2.12.0
TOXIPROXY := .cache/toxiproxy/$(TOXIPROXY_VERSION)/server
toxiproxy:
	@if [ -x $(TOXIPROXY) ]; then :; \
	elif command -v go >/dev/null; then \
		echo "building Toxiproxy $(TOXIPROXY_VERSION) with go install into $(dir $(TOXIPROXY))"; \
		GOBIN=$(CURDIR)/$(dir $(TOXIPROXY)) go install github.com/Shopify/toxiproxy/v2/cmd/server@$(TOXIPROXY_VERSION) || \
			echo "could not build Toxiproxy: hbreg chaos cannot inject network faults (the tests need it)"; \
	else \
		echo "Go not found: hbreg chaos cannot inject network faults without Toxiproxy (the tests need it)"; \
	fi

# Debian's Chromium for the dashboard's browser tests and `hbreg bench dashboard`, driven by Playwright for
# Python (the pip package, in the test extras) through its executable path: no browser download
browser-tools:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium (the dashboard's browser tests)"; \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium >/dev/null; } || echo "could not install chromium: the browser tests will say so"; \
	else \
		echo "/usr/bin/chromium not found (not root, or no apt-get): the browser tests will say so"; \
	fi

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

run: install
	$(BIN)/hbreg up --demo 20

test: install browser-tools $(VENV)/.installed-test lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the tests of pure logic only: no Valkey, no Kafka (seconds)
unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# redis-benchmark (Debian's redis-tools) measures the XADD ceiling the ingest is compared with
bench: install browser-tools $(VENV)/.installed-test
	@command -v redis-benchmark >/dev/null || command -v valkey-benchmark >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && apt-get install -y -q redis-tools >/dev/null; } || \
		echo "redis-benchmark not found: the XADD ceiling is left out"
	$(BIN)/hbreg bench $(BENCH_ARGS)

proto: $(VENV)/.installed-test
	$(BIN)/python proto/generate.py

# refetch the vendored front-end libraries (sinks/web/static/vendor/VENDOR.md): the versions named there, from npm
VENDOR := sinks/web/static/vendor
UPLOT_VERSION := 1.6.32
VIRTUAL_CORE_VERSION := 3.19.11
AXE_VERSION := 4.14.1
vendor:
	rm -rf .cache/npm && mkdir -p .cache/npm
	cd .cache/npm && npm pack --silent uplot@$(UPLOT_VERSION) @tanstack/virtual-core@$(VIRTUAL_CORE_VERSION) \
		axe-core@$(AXE_VERSION) >/dev/null && for t in *.tgz; do mkdir "$${t%.tgz}" && tar -xzf "$$t" -C "$${t%.tgz}"; done
	cp .cache/npm/uplot-*/package/dist/uPlot.esm.js .cache/npm/uplot-*/package/dist/uPlot.iife.min.js \
		.cache/npm/uplot-*/package/dist/uPlot.min.css \
		.cache/npm/uplot-*/package/LICENSE $(VENDOR)/uplot/
	rm -f $(VENDOR)/virtual-core/*.js
	cp .cache/npm/tanstack-virtual-core-*/package/dist/esm/*.js .cache/npm/tanstack-virtual-core-*/package/LICENSE \
		$(VENDOR)/virtual-core/
	sed -i -e 's/process\.env\.NODE_ENV/"production"/g' -e '/^\/\/# sourceMappingURL=/d' $(VENDOR)/virtual-core/*.js
	cp .cache/npm/axe-core-*/package/axe.min.js .cache/npm/axe-core-*/package/LICENSE tests/browser/vendor/

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
