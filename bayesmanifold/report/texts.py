"""The report's words: section titles and how to read each figure (kept apart from the code)."""

__all__ = ["SECTIONS", "EM_HOW", "EM_RECORDED_HOW", "ADVANTAGE_COLUMNS", "ONE_STEP_COLUMNS", "EM_RECORDED_COLUMNS"]

# figure name -> (section title, how to read it)
SECTIONS: dict[str, tuple[str, str]] = {
    "routing_law": (
        "Gradient laws against autograd",
        "Bars are the per-head relative residual between autograd's gradient and the law's closed form; "
        "values near 1e-16 mean the law holds to float64 round-off.",
    ),
    "advantage": (
        "Advantage statistics",
        "Attention mass each head puts on keys whose advantage A = −(b − b̄) is positive, i.e. on values "
        "that point against the error signal. Above 0.5 means the head already favours helpful keys.",
    ),
    "one_step": (
        "One gradient step",
        "Share of the attention mass gained after one small step on W_Q, W_K that went to positive-advantage keys "
        "(bars; 0.5 is the dashed line) and the correlation of the score change with α·A (dots); the table's "
        "adv_weighted_dalpha = mean over queries of Σ_j A_ij Δα_ij must be positive on every head.",
    ),
    "calibration": (
        "Calibration against the exact posterior",
        "Model and Bayes predictive entropy per position (bits), averaged over sequences; the entropy MAE is the "
        "mean gap. A calibrated model's curve lies on the Bayes curve.",
    ),
    "key_orthogonality": (
        "Key orthogonality",
        "Mean off-diagonal cosine between the keys of the hypothesis tokens per layer, beside a random "
        "initialisation and Gaussian vectors. Lower means the hypotheses get separate key directions.",
    ),
    "value_manifold": (
        "Value manifold",
        "Representations at the scored positions projected on their first two principal components, "
        "coloured by the exact posterior entropy. A smooth colour gradient along PC1 is the paper's entropy axis.",
    ),
    "attention_entropy": (
        "Attention focusing",
        "Attention entropy at the scored positions per layer (averaged over heads after the "
        "entropy). A fall from first to last layer is the binding → elimination → refinement picture.",
    ),
    "specialization": (
        "Value specialization",
        "Normalised entropy of each value's responsibility over query groups: low means a "
        "specialist value serving one group (the rich-get-richer prediction).",
    ),
    "dynamics": (
        "Frame vs precision over training",
        "Attention drift (frame) and value drift / calibration (precision) over the "
        "training record on one time axis; the frame should settle long before precision.",
    ),
    "paper3": (
        "Paper III protocol",
        "Per layer: value PC1/PC1+PC2, key orthogonality and attention entropy at the final token.",
    ),
    "induction": (
        "Induction heads on real text (stdlib-attn2, recorded replay)",
        "Left: each head's induction score (attention from the second copy of a repeated random "
        "sequence to the token after the first occurrence) at every weight snapshot, the phase change "
        "shaded; middle: the same on held-out stdlib code (3-token matches); right: for the induction head, "
        "the share of targets whose advantage is positive (minus ½), the share of the positive routing force "
        "that lands on the target key, and the attention on it — the force points at the target before the "
        "attention moves there (summary.json: induction.lead_code). The table: per probe and "
        "phase, the correlation of the routing force −∂L/∂s = αA at snapshot t with the attention change "
        "Δα by snapshot t+1 (r_force; r_pred for the one-step softmax forecast), the |Δα|-weighted sign "
        "agreement, and the share of the attention gained that lands on the induction target. Recorded by "
        "python examples/induction_dynamics.py; the final scores are re-measured live "
        "(summary.json: induction.live_vs_recorded_max_abs).",
    ),
    "em_vs_sgd": ("EM-like vs SGD (Paper II's experiment), live", ""),
    "em_vs_sgd_recorded": (
        "EM-like vs SGD with the controls (recorded full run)",
        "Every method on the same seeds; steps to SGD's mean final loss (1000 = never reached).",
    ),
}

EM_HOW = ("Loss curves of SGD and the EM-like schedule (mean over the two live seeds, 42 and 2024) with "
          "the minimum Bayes entropy H_min. ")

EM_RECORDED_HOW = (
    "The second table is the recorded full run with every control (command: {command}); the "
    "step-size-matched control tells whether the speed-up is EM structure or just a larger value "
    "learning rate."
)

# table columns shown per section
ADVANTAGE_COLUMNS = ["layer", "head", "frac_positive", "mass_positive", "argmax_positive", "routing_top1_share", "routing_effective_keys"]
ONE_STEP_COLUMNS = ["layer", "head", "adv_weighted_dalpha", "frac_queries_toward_positive", "gain_share_positive", "corr_ds_alpha_adv"]
EM_RECORDED_COLUMNS = ("final_loss_mean", "final_loss_std", "entropy_mean", "accuracy_mean", "steps_to_sgd_final_mean")
