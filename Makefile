# xlsnap — build, test and demo. `make test` and `make demo` install what
# they need on a fresh Debian 12 machine (see scripts/deps.sh).
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin:$(HOME)/go/bin
GO ?= go
STATICCHECK_VERSION := v0.8.2
FUZZTIME ?= 10s
LONGFUZZTIME ?= 5m
BENCHTIME ?= 1s

.PHONY: deps build test lint unit fuzz fuzz-short bench demo clean crash

deps:
	@scripts/deps.sh $(STATICCHECK_VERSION)

# bin/xlsnap is built without cgo, so it links no libvirt and starts in a
# fraction of the time; for a libvirt URI it hands the command to
# bin/xlsnap-libvirt, the full cgo build beside it (cmd/xlsnap/connect_*.go).
build: deps
	$(GO) build ./...
	CGO_ENABLED=0 $(GO) build -o bin/xlsnap ./cmd/xlsnap
	$(GO) build -o bin/xlsnap-libvirt ./cmd/xlsnap

# The libxl back end is cgo behind the build tag libxl: built, vetted and
# checked with the tag too, so it cannot rot on machines without Xen.
lint: deps
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags libxl ./...
	$(GO) build -tags libxl ./...
	staticcheck -tags libxl ./...

unit: deps
	$(GO) test -race -count=1 ./...
	$(GO) test -race -count=1 -tags libxl ./xenlight/libxl/

# Each fuzz target runs briefly so `make test` proves the corpus still passes
# and finds nothing new fast; `make fuzz` runs them for longer.
fuzz-short: deps
	@scripts/fuzz.sh $(FUZZTIME)

fuzz: deps
	@scripts/fuzz.sh $(LONGFUZZTIME)

test: lint unit fuzz-short

bench: deps
	set -o pipefail; $(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) ./chain/ ./storage/ ./integration/live/ ./cmd/xlsnap/ | scripts/benchtable.sh

# A long kill campaign: CRASHOPS random operations killed at random
# moments (make test runs 24), then every named crash point.
CRASHOPS ?= 500
crash: deps
	set -o pipefail; XLSNAP_CRASH_OPS=$(CRASHOPS) $(GO) test -count=1 -timeout 60m -run 'TestCrashRandom' -v ./cmd/xlsnap/ | grep -E '^(---|ok|FAIL)|crash_random'
	$(GO) test -count=1 -run 'TestCrash' ./storage/ ./cmd/xlsnap/ ./integration/live/

demo: build
	@scripts/demo.sh

clean:
	rm -rf bin

# Xen paths on a real Xen 4.17 booted under QEMU TCG (integration/xen/):
# the dom0 image is built once from Debian packages and cached in
# /var/cache/xlsnap-xen (needs root: debootstrap, chroot); deps-xen
# installs the tools.
.PHONY: test-xen deps-xen
deps-xen:
	@scripts/deps.sh $(STATICCHECK_VERSION) xen

test-xen: deps-xen
	integration/xen/run.sh
