"""mergemix: data-mixture ablations by modular training and parameter averaging.

Implements Na et al., "Scalable Data Ablation Approximations for Language Models
through Modular Training and Merging" (EMNLP 2024, arXiv 2410.15661).
"""

__version__ = "0.1.0"

import os as _os

# Snakemake exports a job's `threads` as OMP_NUM_THREADS (torch follows it); polars and
# the tokenizers library (rayon) would start a thread per core instead, crowding the jobs
# that run beside them. They get the job's threads too, unless the user set their own.
if _os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(_os.environ["OMP_NUM_THREADS"]) > 0:
    for _name in ("POLARS_MAX_THREADS", "RAYON_NUM_THREADS"):
        _os.environ.setdefault(_name, _os.environ["OMP_NUM_THREADS"])
