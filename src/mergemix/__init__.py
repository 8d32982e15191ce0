"""mergemix: data-mixture ablations by modular training and parameter averaging.

Implements Na et al., "Scalable Data Ablation Approximations for Language Models
through Modular Training and Merging" (EMNLP 2024, arXiv 2410.15661).
"""

__version__ = "0.1.0"
