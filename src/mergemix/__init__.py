"""mergemix: data-mixture ablations by modular training and parameter averaging.

Implements Na et al., "Scalable Data Ablation Approximations for Language Models
through Modular Training and Merging" (EMNLP 2024, arXiv 2410.15661).
"""

__version__ = "0.1.0"

import os as _os

from mergemix.io import job_threads as _job_threads

# Torch follows a Snakemake job's threads (OMP_NUM_THREADS); polars and the tokenizers
# library (rayon) would start a thread per core instead, crowding the jobs that run
# beside them. They get the job's threads too, unless the user set their own.
_threads = _job_threads()
if _threads:
    for _name in ("POLARS_MAX_THREADS", "RAYON_NUM_THREADS"):
        _os.environ.setdefault(_name, str(_threads))
