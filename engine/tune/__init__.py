"""Automatic merge tuning: a recipe's ``{range: [lo, hi]}`` parameters searched by an Optuna
study (``space``, ``study``), each trial merged and scored in memory on the dev split
(``objective``) in this process, local worker processes or Ray actors (``workers``);
``run.tune`` does it end to end; ``adamerging`` learns coefficients by entropy minimisation."""
