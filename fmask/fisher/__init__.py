"""FisherMask's first half: the exact diagonal Fisher, the top-k parameter mask and the masked per-class
gradient embeddings (see :mod:`fmask.fisher.grads` for the method, :mod:`fmask.fisher.mask` for the ranking
and column order, :mod:`fmask.fisher.step` for ``fmask fisher``)."""

from fmask.fisher.grads import (FisherPassPlan, PerSampleGradients, fallback_parameters, fisher_diagonal,
                                masked_embeddings, plan_fisher_pass, softmax_hessian_sqrt)
from fmask.fisher.mask import MaskColumns, mask_size, top_k_mask
from fmask.fisher.profile import MaskProfileRow, mask_profile, mask_profile_from_file, plot_mask_profile
from fmask.fisher.step import FisherResult, MaskFile, load_mask, run_fisher, stratified_subsample

__all__ = [
    "FisherPassPlan", "FisherResult", "MaskColumns", "MaskFile", "MaskProfileRow", "PerSampleGradients", "fallback_parameters",
    "fisher_diagonal", "load_mask", "mask_profile", "mask_profile_from_file", "mask_size", "masked_embeddings",
    "plan_fisher_pass", "plot_mask_profile", "run_fisher", "softmax_hessian_sqrt", "stratified_subsample", "top_k_mask",
]
