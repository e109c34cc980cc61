# Two commands do all the set-up on a fresh machine:
#   make demo   probe gradflow.demos:seed_bug, patch it, and show the proof
#   make test   the test suite on both supported stacks
#   make check  the fast tier (tests not marked slow) on the latest stack: the inner loop, under 3 minutes
#   make train-demo   a short /think fine-tune of a tiny preset on CPU, with the checks built in
#   make wheel-check  build the wheel and the sdist into dist/ and run the wheel outside the source tree
PY ?= python3
# the seed's stack: transformers 4.57.x + peft 0.18.0; the latest: transformers 5.x + peft 0.21.x
# (no comment after a value: make would keep the spaces before it)
OLD := .venv-old
NEW := .venv
TORCH := torch==2.13.0
COMMON := "typer>=0.29,<0.30" "rich>=13" "accelerate>=1.0" safetensors "bitsandbytes==0.50.2" "pytest>=8" "jsonschema>=4.18" "tensorboard>=2.14" "matplotlib>=3.7" "pre-commit>=3"
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: demo train-demo test test-old test-new check venvs clean wheel-check

$(NEW)/.ok:
	$(PY) -m venv $(NEW)
	$(NEW)/bin/pip install $(PIP_FLAGS) $(TORCH)
	$(NEW)/bin/pip install $(PIP_FLAGS) $(TORCH) "transformers>=5,<6" "peft>=0.21,<0.22" "trl>=1,<2" $(COMMON)
	$(NEW)/bin/pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

$(OLD)/.ok:
	$(PY) -m venv $(OLD)
	$(OLD)/bin/pip install $(PIP_FLAGS) $(TORCH)
	$(OLD)/bin/pip install $(PIP_FLAGS) $(TORCH) "transformers==4.57.*" "peft==0.18.0" "trl>=0.24,<0.30" $(COMMON)
	$(OLD)/bin/pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

venvs: $(NEW)/.ok $(OLD)/.ok

demo: $(NEW)/.ok
	@echo "== 1. probe the seed's broken setup (exit 1 = findings) =="
	-$(NEW)/bin/gradflow probe-backward gradflow.demos:seed_bug
	@echo "== 2. patch it: apply the safe fixes, re-probe, show the proof and the code to paste (exit 0 = fixed) =="
	$(NEW)/bin/gradflow patch gradflow.demos:seed_bug

train-demo: $(NEW)/.ok
	$(NEW)/bin/gradflow train tiny-phi3 --data gradflow/data/think_demo.jsonl --output runs/think-demo \
	  --max-steps 60 --lr 1e-2 --seq-len 96 --so8-layers 2,3 --overwrite

test-new: $(NEW)/.ok
	$(NEW)/bin/python -m pytest --durations=20 tests

test-old: $(OLD)/.ok
	$(OLD)/bin/python -m pytest --durations=20 tests

# both stacks at once, one pytest each: the tests run torch on one thread (tests/conftest.py), and about half of
# the slow tier waits on child processes, so two runs share 2 cores well. Each stack's output is printed whole
# when it ends. JOBS=1 runs them one after the other.
JOBS ?= 2
test:
	$(MAKE) --no-print-directory -j$(JOBS) --output-sync=target test-old test-new

# pytest's non-zero exit (5 when nothing was collected) fails the target
check: $(NEW)/.ok
	$(NEW)/bin/python -m pytest -m "not slow" -q --durations=15 tests

# the wheel installed into a fresh venv on top of the latest stack's packages (no download): --help, a probe, schema()
wheel-check: $(NEW)/.ok
	bash .ci/wheel_check $(NEW)

clean:
	rm -rf $(OLD) $(NEW) *.egg-info build dist
