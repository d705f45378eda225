# `make demo` and `make test` are all the set-up a fresh machine needs: each (re)creates
# .venv from requirements.txt when it is missing or older than requirements.txt.
VENV := .venv
PYTHON := $(abspath $(VENV))/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: demo image-demo test venv report submission rehearsal

venv: $(STAMP)

$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# Task 1-1, the course recipe: trains, samples DDPM and the DDIM grid, prints the CD tables.
demo: $(STAMP)
	cd task1/2d_plot_diffusion_todo && $(PYTHON) run_experiment.py --recipe course --seed 0 --out ../../results/2d_course

# Task 1-2 on a CPU stand-in for AFHQ: builds the data and the FID network, trains a small UNet,
# samples DDPM, the DDIM steps x eta grid and the quadratic-spacing rows, writes the FID and KID
# tables (about an hour and a half on 2 cores).
image-demo: $(STAMP)
	cd task1/image_diffusion_todo && $(PYTHON) -m experiments.image_experiment --out ../../results/image_demo

# The offline CPU test suite (what CI runs): one test file per worker process (module-scoped
# fixtures run once), as many workers as cores up to 4, each on one thread (tiny models run fastest
# so, and threads of two workers would only wait on each other).
test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PYTHON) -m pytest -n auto --maxprocesses 4 --dist loadfile tests

# Every command of the assignment at its real size (the course's UNet and batch, SD 1.4 at 512 px) on
# random weights and synthetic data, in a temporary folder: time, peak memory and output sizes per stage,
# and the full jobs' projected hours, into report/rehearsal_<device>.json (about 30 minutes on 2 CPU
# cores; on a GPU it adds fp16, bf16 and gradient checkpointing). REHEARSAL_FLAGS passes flags on (--help).
rehearsal: $(STAMP)
	$(PYTHON) benchmarks/rehearsal.py $(REHEARSAL_FLAGS)

# The report: report/report_template.md filled from the results files (yours when they exist:
# task1/image_diffusion_todo/results/fid_grid/results.json, task2/runs/*/validation/) ->
# report/report.md -> report/report.pdf. REPORT_FLAGS passes flags on, e.g. --lora_run DIR (see --help).
report: $(STAMP)
	$(PYTHON) report/build_report.py $(REPORT_FLAGS)

# The course's zip, <ID>_lab2.zip: report.pdf, Task 1's code, and the two LoRA links in task2/.
# Standard library only: no virtual environment needed.
submission:
	@python3 report/make_submission.py --id "$(ID)" --lora_link_1 "$(LORA_LINK_1)" --lora_link_2 "$(LORA_LINK_2)"
