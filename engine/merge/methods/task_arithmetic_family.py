"""The task-arithmetic family: eight mergekit methods, one declaration each, over one
implementation (engine/merge/gta.py); the chunked CPU path (engine/merge/chunked.py) reads the
same declarations.

Per variant: how each task vector is sparsified (None: kept whole; "magnitude": top-density
|delta|; "random": DARE's drop-and-rescale; "magnitude_outliers": Breadcrumbs, the largest
gamma fraction dropped too; "della_magprune": DELLA's magnitude-rank keep probabilities),
whether the TIES sign consensus runs, and mergekit's normalize/rescale defaults
(mergekit/merge_methods/registry.py). A new variant is one more line here.
"""

from __future__ import annotations

from engine.merge.gta import Variant

TASK_ARITHMETIC = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)"
TIES = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv:2306.01708)"
DARE = ("Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a "
        "Free Lunch, ICML 2024 (arXiv:2311.03099)")
BREADCRUMBS = ("Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse "
               "Masks, ECCV 2024 (arXiv:2312.06795)")
DELLA = ("Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
         "Sampling, 2024 (arXiv:2406.11617)")

VARIANTS: tuple[Variant, ...] = (
    Variant("task_arithmetic", TASK_ARITHMETIC, sparsification=None, consensus=False, normalize=False, rescale=False),
    Variant("ties", TIES, sparsification="magnitude", consensus=True, normalize=True, rescale=False),
    Variant("dare_linear", DARE, sparsification="random", consensus=False, normalize=False, rescale=True),
    Variant("dare_ties", DARE, sparsification="random", consensus=True, normalize=False, rescale=True),
    Variant("breadcrumbs", BREADCRUMBS, sparsification="magnitude_outliers", consensus=False, normalize=False, rescale=False),
    Variant("breadcrumbs_ties", BREADCRUMBS, sparsification="magnitude_outliers", consensus=True, normalize=False, rescale=False),
    Variant("della", DELLA, sparsification="della_magprune", consensus=True, normalize=True, rescale=True),
    Variant("della_linear", DELLA, sparsification="della_magprune", consensus=False, normalize=False, rescale=True),
)
