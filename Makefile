# make demo: a fresh machine to a reconstruction grid in ~6 min on 2 CPU cores (measured 5 min 33 s).
# make demo-resnet: the same for a ResNet-18 (width 16) on 20 real Fashion-MNIST images, --preset resnet with 8
#   simulated epochs (2.1x the iterations of 20 in the same time; benchmarks/README.md, "ResNets, session 18").
# make test: the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
DEMO_FLAGS ?= --dataset fashion_mnist --model_name mlp --num_imgs_per_class 2 --bs 20
DEMO_PRESET ?= --preset fast

DEMO_RESNET_DIR ?= demo-resnet
DEMO_RESNET_FLAGS ?= --dataset fashion_mnist --model_name resnet18 --width 16 --num_imgs_per_class 2 --bs 20
DEMO_RESNET_PRESET ?= --preset resnet --steps 8
DEMO_RESNET_LENGTH ?= --rec_steps_per_epoch 325

.PHONY: venv test demo demo-resnet audit fashion-mnist clean-demo

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

# the defence audit on config A (README, "Does a defence stop it?"): ~30 min on 2 cores, resumable
audit: venv fashion-mnist
	$(PY) benchmarks/audit.py

demo: venv fashion-mnist
	@mkdir -p $(DEMO_DIR)
	cd $(DEMO_DIR) && ../$(PY) ../train.py $(DEMO_FLAGS) --lr 1e-2 --overwrite
	cd $(DEMO_DIR) && ../$(PY) ../recons.py $(DEMO_FLAGS) --tlr 1e-2 $(DEMO_PRESET) --overwrite
	cd $(DEMO_DIR) && ../$(PY) ../metrics.py $(DEMO_FLAGS) --tlr 1e-2 $(DEMO_PRESET) --null_pool 100
	cd $(DEMO_DIR) && ../$(PY) ../draw_pics.py $(DEMO_FLAGS) --tlr 1e-2 $(DEMO_PRESET) --sort ssim

# theta0 is pretrained on 5,000 other Fashion-MNIST images first (cached in $(DEMO_RESNET_DIR)/ckpts/pretrained).
demo-resnet: venv fashion-mnist
	@mkdir -p $(DEMO_RESNET_DIR)
	cd $(DEMO_RESNET_DIR) && ../$(PY) ../train.py $(DEMO_RESNET_FLAGS) --lr 1e-2 --overwrite
	cd $(DEMO_RESNET_DIR) && ../$(PY) ../recons.py $(DEMO_RESNET_FLAGS) --tlr 1e-2 $(DEMO_RESNET_PRESET) $(DEMO_RESNET_LENGTH) --overwrite
	cd $(DEMO_RESNET_DIR) && ../$(PY) ../metrics.py $(DEMO_RESNET_FLAGS) --tlr 1e-2 $(DEMO_RESNET_PRESET) --null_pool 100
	cd $(DEMO_RESNET_DIR) && ../$(PY) ../draw_pics.py $(DEMO_RESNET_FLAGS) --tlr 1e-2 $(DEMO_RESNET_PRESET) --sort ssim

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO_RESNET_DIR)
