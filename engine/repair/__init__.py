"""Safety repair: give back the refusals fine-tuning took, keeping what it taught.

From an aligned model and its fine-tune (and, for IRR and RESTA, an unaligned model), a
method rebuilds the fine-tune with less of the delta that hurts safety: Safe Delta
(``safe_delta``), IRR (``irr``) and the baselines ``resta``, ``random_mask`` and
``delta_scale``. ``registry`` lists them; ``run.repair`` streams a model through one.
"""
