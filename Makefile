VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnff train --compare --image-size 16 --out runs/demo

# The exactness tests run twice: on this CPU's own kernels, then with ATen, oneDNN, MKL and bnff's
# kernels (and libxsmm's, when installed) held to AVX2 (its own build cache), so AVX-512 machines also
# exercise the AVX2 paths.
# The rehearsal skips the pure-PyTorch "reference" backend's cases (it has no kernels of its own),
# Inception-v3 under bf16 and in fp32, and ResNet-18 under bf16 (16, 13 and 17 s of emulated bf16 or
# of a large graph at AVX2; DenseNet, MobileNetV2 and the pattern tests cover the same kernels there).
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 LIBXSMM_TARGET=hsw
REHEARSAL_SKIPS := --deselect 'tests/test_restructure.py::test_bf16_autocast_channels_last_tracks_eager[cpu]' \
	--deselect 'tests/test_families.py::test_fp32_as_accurate_as_eager_against_float64[inception_v3-cpu]'

# The rehearsal's kernels (their own build, about 50 s) are built at low priority beside the main run,
# whose many small tests leave a core idle much of the time; the rehearsal waits for that build to finish.
CAPABILITY = $$($(PY) -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')

test: $(STAMP)
	@if [ "$(CAPABILITY)" != AVX2 ]; then \
		(nice -n 19 env $(AVX2) $(PY) -c 'from bnff.ops.backends import cpu; cpu.available()' >/dev/null 2>&1 &); fi
	$(PY) -m pytest -q
	@if [ "$(CAPABILITY)" = AVX2 ]; then \
		echo "AVX2 rehearsal skipped: this CPU runs at the AVX2 level already (the run above)"; \
	else $(AVX2) $(PY) -m pytest -q -m exactness -k 'not reference and not triton and not (bf16 and inception)' $(REHEARSAL_SKIPS); fi

clean:
	rm -rf $(VENV) runs .pytest_cache
