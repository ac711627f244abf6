"""Preference losses on per-sequence log-probabilities: DPO, weighted DPO, MLPO.

Every loss takes summed log-probabilities log π(y|x) of whole responses, under the policy
(carrying gradient) and under the frozen reference (the SFT model, precomputed once). The
implicit reward of a response is r = γ·(log π_θ(y|x) − log π_ref(y|x)).

- DPO (HSCR eq. 2): −log σ(r_w − r_l).
- Weighted DPO (MMedPO eq. 3):
  L = −E_{(x, x*, y_w, y_l, s')}[ s' · log σ(α log π_θ(y_w|x)/π_o(y_w|x) − α log π_θ(y_l|x*)/π_o(y_l|x*)) ]
  i.e. the per-pair weight s' multiplies the log-sigmoid term; it is not inside the sigmoid.
  (x* is the noised image of a visual dispreference; here that only changes how the caller
  computes the rejected log-probs.)
- MLPO (HSCR eq. 5–7): L_E + L_I with
  L_E = −Σ_j log σ(r_w − r_lj)                (chosen vs each dispreferred)
  L_I = −Σ_j Σ_{m>j} log σ(r_lj − r_lm)        (higher-ranked vs lower-ranked dispreferred)
  Dispreferred index 0 is the highest-ranked (most similar to the chosen answer, "least bad").
  `implicit_mask` leaves dispreferred out of L_I: MMedPO's visual dispreference (the chosen
  answer under a noised image) has no similarity rank among the textual ones, so it takes part
  in L_E and the reward metrics only.

Reduction (docs/design.md § "Losses"): sum over terms within an entry, mean over entries; weights
multiply terms as in MMedPO eq. 3, no renormalization by their sum. Weights (docs/design.md §
"Weights") are per dispreferred response: explicit term j carries w_j, implicit term (j, m)
carries (w_j + w_m)/2.

Losses are computed in float32 whatever the input dtype, because summed log-probs of long
responses lose the digits the loss depends on in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossOutput:
    """A loss and its diagnostics. All fields are 0-dim tensors (or None).

    `loss` = `explicit` + `implicit` (+ nll_weight · `nll` after `with_nll`) and carries gradient;
    the parts do too, so either can be back-propagated alone. `nll` is None unless `with_nll`
    added the chosen answers' likelihood term. The metrics are detached and stay on the device, so logging them does
    not force a host sync every step (call `to_dict` when you do want numbers).

    - reward_margin: mean over entries of r_w − mean_j r_lj.
    - reward_accuracy: fraction of entries where r_w exceeds every dispreferred reward.
    - ranking_accuracy: fraction of valid pairs j < m with r_lj > r_lm (both ranked, see
      `implicit_mask`); None when the input has fewer than two dispreferred per entry, NaN when
      masking leaves no valid pair.
    """

    loss: Tensor
    explicit: Tensor
    implicit: Tensor
    reward_margin: Tensor
    reward_accuracy: Tensor
    ranking_accuracy: Tensor | None
    nll: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """Python floats for logging; None for a missing or NaN ranking accuracy."""
        out: dict[str, Any] = {}
        for name in ("loss", "explicit", "implicit", "nll", "reward_margin", "reward_accuracy", "ranking_accuracy"):
            value = getattr(self, name)
            value = None if value is None else float(value.detach().item())
            out[name] = None if value is not None and math.isnan(value) else value
        return out


def shift_for_next_token(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's outputs for `sequence_logprobs`.

    A Hugging Face causal LM returns logits[:, t] predicting input_ids[:, t + 1]. Dropping the
    last logit and the first label gives logits[:, t] predicting labels[:, t].
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    return logits[:, :-1, :], labels[:, 1:]


def sequence_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Summed log-probabilities of `labels` under `logits`, one per sequence.

    `logits` (B, T, V) must already be aligned so that logits[:, t] is the distribution that
    predicts labels[:, t] (use `shift_for_next_token` on raw causal-LM outputs). Positions where
    labels == ignore_index (prompt, image and padding tokens) are left out. Returns (B,) float32.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    logits = logits.float()
    # gather − logsumexp rather than a full log_softmax: only the label column is needed.
    picked = torch.gather(logits, -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(-1)


def _check_pair(name: str, policy: Tensor, ref: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(policy.shape) != shape or tuple(ref.shape) != shape:
        raise ValueError(
            f"{name}: policy {tuple(policy.shape)} and reference {tuple(ref.shape)} log-probs must both "
            f"have shape {shape}"
        )


def mlpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    gamma: float,
    explicit: bool,
    implicit: bool,
    weights: Tensor | None = None,
    rejected_mask: Tensor | None = None,
    implicit_mask: Tensor | None = None,
) -> LossOutput:
    """Multi-level preference optimization (HSCR eq. 5–7), optionally weighted.

    Shapes: chosen log-probs (E,), rejected log-probs (E, J) with dispreferred ranked best-first
    along J. `weights` (E, J) weight each dispreferred response (explicit term j: w_j; implicit
    term (j, m): (w_j + w_m)/2). `rejected_mask` (E, J) bool marks real dispreferred responses
    (True) against padding, so entries may have fewer than J; padded values are never read.
    `implicit_mask` (E, J) bool marks the dispreferred that take part in L_I's pairwise ranking
    (and `ranking_accuracy`); a False one (a visual dispreference, which has no rank among the
    textual ones) still counts in L_E and the reward metrics. None: all of them.
    Every entry should keep at least one dispreferred: one without contributes zero loss (it
    still counts in the mean over entries) and is left out of the reward metrics.
    Reference log-probs and weights are treated as constants.
    """
    if not (explicit or implicit):
        raise ValueError("mlpo_loss: explicit and implicit are both off, so there is no loss to compute")
    if gamma <= 0:
        raise ValueError(f"mlpo_loss: gamma must be positive, got {gamma}")
    if policy_chosen.dim() != 1 or policy_rejected.dim() != 2:
        raise ValueError(
            "mlpo_loss: expected chosen log-probs of shape (E,) and rejected of shape (E, J), got "
            f"{tuple(policy_chosen.shape)} and {tuple(policy_rejected.shape)}"
        )
    n_entries, n_rejected = policy_rejected.shape
    _check_pair("chosen", policy_chosen, ref_chosen, (n_entries,))
    _check_pair("rejected", policy_rejected, ref_rejected, (n_entries, n_rejected))
    if n_entries == 0 or n_rejected == 0:
        raise ValueError(
            f"mlpo_loss: need at least one entry and one dispreferred, got E={n_entries}, J={n_rejected}"
        )
    if implicit and not explicit and n_rejected < 2:
        raise ValueError("mlpo_loss: implicit-only MLPO needs at least two dispreferred responses per entry")
    if weights is not None and tuple(weights.shape) != (n_entries, n_rejected):
        raise ValueError(
            f"mlpo_loss: weights must have shape {(n_entries, n_rejected)}, got {tuple(weights.shape)}"
        )
    if rejected_mask is not None:
        if tuple(rejected_mask.shape) != (n_entries, n_rejected):
            raise ValueError(
                f"mlpo_loss: rejected_mask must have shape {(n_entries, n_rejected)}, got {tuple(rejected_mask.shape)}"
            )
        if rejected_mask.dtype != torch.bool:
            raise ValueError(f"mlpo_loss: rejected_mask must be a bool tensor, got {rejected_mask.dtype}")
    if implicit_mask is not None:
        if tuple(implicit_mask.shape) != (n_entries, n_rejected):
            raise ValueError(
                f"mlpo_loss: implicit_mask must have shape {(n_entries, n_rejected)}, got {tuple(implicit_mask.shape)}"
            )
        if implicit_mask.dtype != torch.bool:
            raise ValueError(f"mlpo_loss: implicit_mask must be a bool tensor, got {implicit_mask.dtype}")

    device = policy_rejected.device
    valid = (
        rejected_mask.to(device)
        if rejected_mask is not None
        else torch.ones(n_entries, n_rejected, dtype=torch.bool, device=device)
    )
    r_chosen = gamma * (policy_chosen.float() - ref_chosen.detach().float().to(device))
    r_rejected = gamma * (policy_rejected.float() - ref_rejected.detach().float().to(device))
    # Zero the padding before any arithmetic: where() blocks the value, but a NaN or inf in a
    # padded slot would still poison the gradient through log-sigmoid's backward.
    r_rejected = torch.where(valid, r_rejected, torch.zeros_like(r_rejected))
    w = (
        weights.detach().float().to(device)
        if weights is not None
        else torch.ones(n_entries, n_rejected, device=device)
    )
    w = torch.where(valid, w, torch.zeros_like(w))
    # A switched-off part is a plain zero; `loss` still has a graph through the part that is on.
    zero = torch.zeros((), device=device)

    explicit_loss = zero
    if explicit:
        terms = -F.logsigmoid(r_chosen.unsqueeze(1) - r_rejected) * w
        explicit_loss = terms.sum(1).mean()

    ranked = valid & implicit_mask.to(device) if implicit_mask is not None else valid
    j_idx, m_idx = torch.triu_indices(n_rejected, n_rejected, offset=1, device=device)
    pair_valid = ranked[:, j_idx] & ranked[:, m_idx]  # (E, P)
    pair_diff = r_rejected[:, j_idx] - r_rejected[:, m_idx]
    implicit_loss = zero
    if implicit and j_idx.numel() > 0:
        pair_w = (w[:, j_idx] + w[:, m_idx]) / 2 * pair_valid
        implicit_loss = (-F.logsigmoid(pair_diff) * pair_w).sum(1).mean()

    with torch.no_grad():
        n_valid = valid.sum(1)
        has_rejected = n_valid > 0
        n_with = has_rejected.sum().clamp(min=1)
        mean_rejected = r_rejected.sum(1) / n_valid.clamp(min=1)
        margin = torch.where(has_rejected, r_chosen - mean_rejected, torch.zeros_like(r_chosen))
        beats_all = ((r_chosen.unsqueeze(1) > r_rejected) | ~valid).all(1) & has_rejected
        ranking = None
        if j_idx.numel() > 0:
            # 0/0 gives NaN when masking leaves no pair, without a host sync to check.
            ranking = ((pair_diff > 0) & pair_valid).sum().float() / pair_valid.sum().float()
        metrics = {
            "reward_margin": margin.sum() / n_with,
            "reward_accuracy": beats_all.sum().float() / n_with,
            "ranking_accuracy": ranking,
        }

    return LossOutput(
        loss=explicit_loss + implicit_loss,
        explicit=explicit_loss,
        implicit=implicit_loss,
        **metrics,
    )


def with_nll(out: LossOutput, policy_chosen: Tensor, chosen_length: Tensor, weight: float) -> LossOutput:
    """Add `weight` x the mean per-token negative log-likelihood of the chosen answers to `out.loss`.

    The preference terms only see differences of log-ratios, so they can be lowered by pushing
    every answer down, the chosen one included; the NLL term anchors the chosen answer's
    likelihood (RPO, Pang et al. 2024; TRL's `rpo_alpha`). Shapes: (E,) summed log-probs and
    (E,) token counts.
    """
    if weight < 0:
        raise ValueError(f"with_nll: weight must be >= 0, got {weight}")
    if policy_chosen.shape != chosen_length.shape or policy_chosen.dim() != 1:
        raise ValueError(
            f"with_nll: chosen log-probs {tuple(policy_chosen.shape)} and lengths {tuple(chosen_length.shape)} "
            "must both be (E,)"
        )
    if bool((chosen_length <= 0).any()):
        raise ValueError("with_nll: every chosen answer needs at least one token")
    nll = -(policy_chosen.float() / chosen_length.float().to(policy_chosen.device)).mean()
    return replace(out, loss=out.loss + weight * nll, nll=nll)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    gamma: float,
    weights: Tensor | None = None,
) -> LossOutput:
    """DPO (HSCR eq. 2), or weighted DPO (MMedPO eq. 3) when `weights` is given.

    All inputs are (B,). loss = mean_b −w_b · log σ(γ[(π_w − ref_w) − (π_l − ref_l)]): the weight
    multiplies the log-sigmoid term, as in MMedPO eq. 3. `explicit` equals `loss`, `implicit` is
    0 and `ranking_accuracy` is None.
    """
    if policy_chosen.dim() != 1:
        raise ValueError(
            f"dpo_loss: expected (B,) log-probs, got chosen of shape {tuple(policy_chosen.shape)}"
        )
    n = policy_chosen.shape[0]
    _check_pair("chosen", policy_chosen, ref_chosen, (n,))
    _check_pair("rejected", policy_rejected, ref_rejected, (n,))
    if weights is not None and tuple(weights.shape) != (n,):
        raise ValueError(f"dpo_loss: weights must have shape {(n,)}, got {tuple(weights.shape)}")
    # One dispreferred per entry: MLPO's explicit term is exactly (weighted) DPO.
    return mlpo_loss(
        policy_chosen,
        policy_rejected.unsqueeze(1),
        ref_chosen,
        ref_rejected.unsqueeze(1),
        gamma=gamma,
        explicit=True,
        implicit=False,
        weights=None if weights is None else weights.unsqueeze(1),
    )
