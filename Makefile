# make demo   - set up .venv, generate the demo COCO-style dataset, train with lock -> unlock, print results
#               and the compare tool's table, and write its curves (PNG path printed last)
# make demo-video - generate the synthetic MSR-VTT (moving shapes), train the frame aggregation of a
#               tiny model with both towers locked, print T2V / V2T recall (a few minutes on 2 cores)
# make test   - set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA := demo_data
DEMO_NAME ?= demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_VIDEO_DATA := demo_video_data
PYTEST_ARGS ?=

.PHONY: venv demo demo-video test clean bench

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.1"
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import open_clip_train, sys; sys.exit(0 if '/src/open_clip_train' in open_clip_train.__file__.replace(chr(92), '/') else 'open_clip_train resolves to ' + open_clip_train.__file__)"
	touch $(STAMP)

$(DEMO_DATA)/annotations/captions_val2017.json: | $(STAMP)
	$(PY) -m open_clip_train.demo_data $(DEMO_DATA) --num-train 2000 --num-val 250 --image-size 64 --seed 0

# the demo's shape classes as a labelled ImageFolder, for a zero-shot line per evaluated epoch
$(DEMO_DATA)/zeroshot/classnames.txt: | $(STAMP)
	$(PY) -m open_clip_train.demo_data --zeroshot-out $(DEMO_DATA)/zeroshot --zeroshot-by shape --zeroshot-per-class 20 --image-size 64 --seed 1

demo: $(STAMP) $(DEMO_DATA)/annotations/captions_val2017.json $(DEMO_DATA)/zeroshot/classnames.txt
	HF_HUB_OFFLINE=1 $(PY) -m open_clip_train.main \
	    --model tiny-convnext-cliptext --dataset-type coco \
	    --train-data $(DEMO_DATA)/annotations/captions_train2017.json \
	    --val-data $(DEMO_DATA)/annotations/captions_val2017.json \
	    --epochs 6 --batch-size 64 --lr 2e-3 --wd 0.1 --warmup 50 --workers 2 --precision fp32 \
	    --lock-image --unfreeze-image-at-epoch 2 --unfreeze-new-lr-scale 0.5 \
	    --val-at-start --log-every-n-steps 20 --seed 0 \
	    --zeroshot-data $(DEMO_DATA)/zeroshot --zeroshot-classnames $(DEMO_DATA)/zeroshot/classnames.txt \
	    --zeroshot-templates $(DEMO_DATA)/zeroshot/templates.txt --zeroshot-name shapes --zeroshot-frequency 1 \
	    --log-dir logs --name $(DEMO_NAME)
	$(PY) -m open_clip_train.results_table logs/$(DEMO_NAME)
	$(PY) -m open_clip_train.compare logs/$(DEMO_NAME) --plot logs/$(DEMO_NAME)/curves.png
	@echo "curves (recall per epoch, loss per step, the unlock marked): logs/$(DEMO_NAME)/curves.png"

$(DEMO_VIDEO_DATA)/MSRVTT_data.json: | $(STAMP)
	$(PY) -m open_clip_train.demo_video_data $(DEMO_VIDEO_DATA) --num-train 300 --num-test 60 --seed 0

# Both towers locked: AFA's frame scoring (video_pool.afa), the image head and the logit scale train.
# Mean pooling has no parameters, so AFA gives the run something to aggregate with; warmup matters
# (without it the loss stays at ln(batch)).
demo-video: $(STAMP) $(DEMO_VIDEO_DATA)/MSRVTT_data.json
	HF_HUB_OFFLINE=1 $(PY) -m open_clip_train.main \
	    --model tiny-convnext-cliptext --dataset-type msrvtt \
	    --train-data $(DEMO_VIDEO_DATA) --val-data $(DEMO_VIDEO_DATA) --msrvtt-test 1k-A \
	    --video-pooling afa --max-frames 4 --lock-image --lock-text \
	    --epochs 4 --batch-size 32 --lr 2e-3 --wd 0.1 --warmup 30 --workers 2 --precision fp32 \
	    --val-at-start --log-every-n-steps 20 --seed 0 \
	    --log-dir logs --name video-$(DEMO_NAME)
	$(PY) -m open_clip_train.compare logs/video-$(DEMO_NAME)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# Throughput / memory of ours vs upstream's trainer (separate venv), written to benchmarks/results.*
bench: $(STAMP)
	bash benchmarks/setup_upstream_env.sh
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(DEMO_DATA) $(DEMO_VIDEO_DATA) logs .pytest_cache
