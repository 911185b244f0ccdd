# make demo: a fresh machine to a reconstruction grid in ~6 min on 2 CPU cores (measured 5 min 33 s).
# make test: the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
DEMO_FLAGS ?= --dataset fashion_mnist --model_name mlp --num_imgs_per_class 2 --bs 20
DEMO_PRESET ?= --preset fast

.PHONY: venv test demo fashion-mnist clean-demo

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest tests -q

# Real Fashion-MNIST: Debian's dataset-fashion-mnist when apt works, else torchvision downloads it.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || \
	  (command -v apt-get >/dev/null && (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null))) || \
	  echo "dataset-fashion-mnist not installed; train.py will try torchvision's download"

demo: venv fashion-mnist
	@mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && ../$(PY) ../train.py $(DEMO_FLAGS) --lr 1e-2 --overwrite
	cd $(DEMO_DIR) && ../$(PY) ../recons.py $(DEMO_FLAGS) --tlr 1e-2 $(DEMO_PRESET) --overwrite
	cd $(DEMO_DIR) && ../$(PY) ../metrics.py $(DEMO_FLAGS) --tlr 1e-2 $(DEMO_PRESET)
	cd $(DEMO_DIR) && ../$(PY) ../draw_pics.py $(DEMO_FLAGS) --tlr 1e-2 $(DEMO_PRESET) --sort ssim

clean-demo:
	rm -rf $(DEMO_DIR)
