"""Preference losses against hand-computed values: DPO, weighted DPO, MLPO, sequence log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import dpo_loss, mlpo_loss, sequence_logprobs, shift_for_next_token, with_nll


def neg_logsig(x: float) -> float:
    """−log σ(x) = log(1 + e^−x), written out so the tests do not lean on torch."""
    return math.log(1.0 + math.exp(-x))


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- sequence_logprobs -------------------------------------------------------------------------


def test_sequence_logprobs_hand_computed() -> None:
    rows = [[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [2.0, 0.0, -1.0]]
    logits = t([rows, rows])  # (B=2, T=3, V=3)
    labels = torch.tensor([[2, -100, 0], [-100, -100, -100]])

    def log_softmax(row: list[float], k: int) -> float:
        return row[k] - math.log(sum(math.exp(v) for v in row))

    expected_0 = log_softmax(rows[0], 2) + log_softmax(rows[2], 0)  # position 1 ignored
    out = sequence_logprobs(logits, labels)
    assert out.shape == (2,)
    assert out.dtype == torch.float32
    assert out[0].item() == pytest.approx(expected_0, abs=1e-6)
    assert out[1].item() == 0.0  # nothing to score


def test_sequence_logprobs_custom_ignore_index_and_bf16() -> None:
    logits = t([[[0.0, 1.0], [1.0, 0.0]]])
    labels = torch.tensor([[1, 7]])
    expected = 1.0 - math.log(1.0 + math.e)
    assert sequence_logprobs(logits, labels, ignore_index=7).item() == pytest.approx(expected, abs=1e-6)
    out = sequence_logprobs(logits.to(torch.bfloat16), labels, ignore_index=7)
    assert out.dtype == torch.float32


def test_shift_for_next_token() -> None:
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    input_ids = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 1]])
    shifted_logits, shifted_labels = shift_for_next_token(logits, input_ids)
    assert shifted_logits.shape == (2, 3, 3)
    assert torch.equal(shifted_logits, logits[:, :3])
    assert torch.equal(shifted_labels, input_ids[:, 1:])


def test_sequence_logprobs_shape_errors() -> None:
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


# --- DPO / weighted DPO ------------------------------------------------------------------------

# gamma = 0.1: chosen rewards 0.1·[(−10)−(−11), (−12)−(−12)] = [0.1, 0.0],
# rejected rewards 0.1·[(−14)−(−13), (−9)−(−10)] = [−0.1, 0.1]; reward differences [0.2, −0.1].
PC, PR, RC, RR = t([-10.0, -12.0]), t([-14.0, -9.0]), t([-11.0, -12.0]), t([-13.0, -10.0])


def test_dpo_hand_computed() -> None:
    out = dpo_loss(PC, PR, RC, RR, gamma=0.1)
    expected = (neg_logsig(0.2) + neg_logsig(-0.1)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.explicit.item() == pytest.approx(expected, abs=1e-6)
    assert out.implicit.item() == 0.0
    assert out.reward_margin.item() == pytest.approx((0.2 - 0.1) / 2, abs=1e-6)
    assert out.reward_accuracy.item() == pytest.approx(0.5)
    assert out.ranking_accuracy is None


def test_weighted_dpo_weight_multiplies_log_sigmoid() -> None:
    # MMedPO eq. 3: −E[s' · log σ(...)].
    out = dpo_loss(PC, PR, RC, RR, gamma=0.1, weights=t([1.25, 0.75]))
    expected = (1.25 * neg_logsig(0.2) + 0.75 * neg_logsig(-0.1)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_dpo_unit_weights_equal_unweighted() -> None:
    plain = dpo_loss(PC, PR, RC, RR, gamma=0.1)
    weighted = dpo_loss(PC, PR, RC, RR, weights=torch.ones(2), gamma=0.1)
    assert weighted.loss.item() == pytest.approx(plain.loss.item(), abs=1e-7)


# --- MLPO ---------------------------------------------------------------------------------------

# One entry, gamma = 0.5, reference all zero: r_w = 1.0, r_l = [0.5, 0.0, 0.25] (ranked best-first).
MC, MR = t([2.0]), t([[1.0, 0.0, 0.5]])
ZC, ZR = torch.zeros(1), torch.zeros(1, 3)


def test_mlpo_hand_computed() -> None:
    out = mlpo_loss(MC, MR, ZC, ZR, gamma=0.5, explicit=True, implicit=True)
    explicit = neg_logsig(1.0 - 0.5) + neg_logsig(1.0 - 0.0) + neg_logsig(1.0 - 0.25)
    # Pairs (0,1), (0,2), (1,2): higher-ranked minus lower-ranked reward.
    implicit = neg_logsig(0.5 - 0.0) + neg_logsig(0.5 - 0.25) + neg_logsig(0.0 - 0.25)
    assert out.explicit.item() == pytest.approx(explicit, abs=1e-6)
    assert out.implicit.item() == pytest.approx(implicit, abs=1e-6)
    assert out.loss.item() == pytest.approx(explicit + implicit, abs=1e-6)
    assert out.reward_margin.item() == pytest.approx(1.0 - 0.75 / 3, abs=1e-6)
    assert out.reward_accuracy.item() == 1.0
    assert out.ranking_accuracy is not None
    assert out.ranking_accuracy.item() == pytest.approx(2 / 3)


def test_with_nll_adds_the_chosen_per_token_nll() -> None:
    chosen = t([-2.0, -0.5])  # summed log-probs of a 4-token and a 1-token answer
    lengths = t([4.0, 1.0])
    base = mlpo_loss(chosen, t([[-3.0], [-1.0]]), t([-2.5, -1.0]), t([[-2.0], [-1.5]]), gamma=0.5, explicit=True, implicit=True)
    out = with_nll(base, chosen, lengths, weight=0.5)
    nll = (2.0 / 4 + 0.5 / 1) / 2
    assert out.nll is not None and out.nll.item() == pytest.approx(nll, abs=1e-6)
    assert out.loss.item() == pytest.approx(base.loss.item() + 0.5 * nll, abs=1e-6)
    # the preference parts and metrics are carried over unchanged
    assert out.explicit.item() == base.explicit.item()
    assert out.reward_margin.item() == base.reward_margin.item()
    assert base.nll is None and base.to_dict()["nll"] is None and out.to_dict()["nll"] == pytest.approx(nll)
    with pytest.raises(ValueError, match=">= 0"):
        with_nll(base, chosen, lengths, weight=-1.0)
    with pytest.raises(ValueError, match="at least one token"):
        with_nll(base, chosen, t([4.0, 0.0]), weight=1.0)


def test_mlpo_weighted_hand_computed() -> None:
    w = [1.2, 0.8, 1.0]
    out = mlpo_loss(MC, MR, ZC, ZR, gamma=0.5, weights=t([w]), explicit=True, implicit=True)
    explicit = w[0] * neg_logsig(0.5) + w[1] * neg_logsig(1.0) + w[2] * neg_logsig(0.75)
    implicit = (
        (w[0] + w[1]) / 2 * neg_logsig(0.5)
        + (w[0] + w[2]) / 2 * neg_logsig(0.25)
        + (w[1] + w[2]) / 2 * neg_logsig(-0.25)
    )
    assert out.explicit.item() == pytest.approx(explicit, abs=1e-6)
    assert out.implicit.item() == pytest.approx(implicit, abs=1e-6)


def test_mlpo_switches() -> None:
    both = mlpo_loss(MC, MR, ZC, ZR, gamma=0.5, explicit=True, implicit=True)
    only_e = mlpo_loss(MC, MR, ZC, ZR, gamma=0.5, implicit=False, explicit=True)
    only_i = mlpo_loss(MC, MR, ZC, ZR, gamma=0.5, explicit=False, implicit=True)
    assert only_e.implicit.item() == 0.0 and only_i.explicit.item() == 0.0
    assert only_e.loss.item() == pytest.approx(both.explicit.item(), abs=1e-7)
    assert only_i.loss.item() == pytest.approx(both.implicit.item(), abs=1e-7)


def test_mlpo_mean_over_entries() -> None:
    # Entry 2 is entry 1 with every reward shifted by the same amount: same loss, so the mean
    # over two entries equals the single-entry loss (a sum over entries would double it).
    one = mlpo_loss(MC, MR, ZC, ZR, gamma=0.5, explicit=True, implicit=True)
    two = mlpo_loss(
        t([2.0, 5.0]), t([[1.0, 0.0, 0.5], [4.0, 3.0, 3.5]]), torch.zeros(2), torch.zeros(2, 3), gamma=0.5, explicit=True, implicit=True)
    assert two.loss.item() == pytest.approx(one.loss.item(), abs=1e-6)


def test_mlpo_single_rejected_equals_dpo() -> None:
    dpo = dpo_loss(PC, PR, RC, RR, gamma=0.1, weights=t([1.25, 0.75]))
    for implicit in (False, True):  # with J = 1 there is no implicit pair either way
        mlpo = mlpo_loss(
            PC, PR[:, None], RC, RR[:, None], gamma=0.1, implicit=implicit, weights=t([[1.25], [0.75]]), explicit=True)
        assert mlpo.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-7)
        assert mlpo.reward_margin.item() == pytest.approx(dpo.reward_margin.item(), abs=1e-7)
        assert mlpo.reward_accuracy.item() == dpo.reward_accuracy.item()


def test_mlpo_unit_weights_equal_unweighted() -> None:
    plain = mlpo_loss(MC, MR, ZC, ZR, gamma=0.5, explicit=True, implicit=True)
    weighted = mlpo_loss(MC, MR, ZC, ZR, gamma=0.5, weights=torch.ones(1, 3), explicit=True, implicit=True)
    assert weighted.loss.item() == pytest.approx(plain.loss.item(), abs=1e-7)


def test_mlpo_masking_equals_dropping() -> None:
    # Entry 0 has three dispreferred, entry 1 only two; its third slot is padding holding garbage.
    pc = t([2.0, 1.0])
    pr = t([[1.0, 0.0, 0.5], [0.3, -0.4, float("nan")]])
    rc = t([0.5, 0.0])
    rr = t([[0.2, 0.1, 0.0], [0.0, 0.1, float("inf")]])
    w = t([[1.1, 0.9, 1.0], [1.2, 0.8, float("nan")]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    pr.requires_grad_(True)
    padded = mlpo_loss(pc, pr, rc, rr, gamma=0.5, weights=w, rejected_mask=mask, explicit=True, implicit=True)
    e0 = mlpo_loss(pc[:1], pr[:1].detach(), rc[:1], rr[:1], gamma=0.5, weights=w[:1], explicit=True, implicit=True)
    e1 = mlpo_loss(pc[1:], pr[1:, :2].detach(), rc[1:], rr[1:, :2], gamma=0.5, weights=w[1:, :2], explicit=True, implicit=True)
    assert padded.loss.item() == pytest.approx((e0.loss.item() + e1.loss.item()) / 2, abs=1e-6)
    assert padded.reward_margin.item() == pytest.approx(
        (e0.reward_margin.item() + e1.reward_margin.item()) / 2, abs=1e-6
    )
    # 3 valid pairs in entry 0, 1 in entry 1.
    expected_rank = (e0.ranking_accuracy.item() * 3 + e1.ranking_accuracy.item() * 1) / 4
    assert padded.ranking_accuracy.item() == pytest.approx(expected_rank)
    padded.loss.backward()
    assert torch.isfinite(pr.grad).all()
    assert pr.grad[1, 2].item() == 0.0


def test_mlpo_masked_column_equals_dropped_column() -> None:
    pr = t([[1.0, 0.0, 0.5]])
    masked = mlpo_loss(MC, pr, ZC, ZR, gamma=0.5, rejected_mask=torch.tensor([[True, True, False]]), explicit=True, implicit=True)
    dropped = mlpo_loss(MC, pr[:, :2], ZC, ZR[:, :2], gamma=0.5, explicit=True, implicit=True)
    assert masked.to_dict() == pytest.approx(dropped.to_dict())


def test_implicit_mask_leaves_a_dispreferred_out_of_the_ranking_only() -> None:
    # A visual dispreferred (MMedPO) appended to the ranked ones: it has no rank, so it must not
    # enter L_I or ranking_accuracy, but it stays in L_E and the reward metrics.
    pr = t([[1.0, 0.0, 0.5, 1.5]])  # the last one's reward (0.75) beats every ranked one
    zr = torch.zeros(1, 4)
    w = t([[1.2, 0.8, 1.0, 0.9]])
    ranked = torch.tensor([[True, True, True, False]])
    out = mlpo_loss(MC, pr, ZC, zr, gamma=0.5, weights=w, implicit_mask=ranked, explicit=True, implicit=True)
    textual = mlpo_loss(MC, pr[:, :3], ZC, zr[:, :3], gamma=0.5, weights=w[:, :3], explicit=True, implicit=True)
    everything = mlpo_loss(MC, pr, ZC, zr, gamma=0.5, weights=w, explicit=True, implicit=True)
    # implicit: exactly the three textual pairs, as if the fourth were not there
    assert out.implicit.item() == pytest.approx(textual.implicit.item(), abs=1e-6)
    assert out.ranking_accuracy.item() == pytest.approx(textual.ranking_accuracy.item())
    assert everything.implicit.item() > out.implicit.item()  # unmasked, its pairs would count
    # explicit and reward metrics: every dispreferred, as without the mask
    assert out.explicit.item() == pytest.approx(everything.explicit.item(), abs=1e-6)
    assert out.explicit.item() == pytest.approx(textual.explicit.item() + 0.9 * neg_logsig(1.0 - 0.75), abs=1e-6)
    assert out.reward_margin.item() == pytest.approx(everything.reward_margin.item(), abs=1e-6)
    assert out.reward_accuracy.item() == everything.reward_accuracy.item() == 1.0
    # a masked-out value changes no implicit term, whatever it is
    shifted = mlpo_loss(MC, t([[1.0, 0.0, 0.5, -7.0]]), ZC, zr, gamma=0.5, weights=w, implicit_mask=ranked,
                        explicit=True, implicit=True)
    assert shifted.implicit.item() == pytest.approx(out.implicit.item(), abs=1e-6)
    assert shifted.ranking_accuracy.item() == pytest.approx(out.ranking_accuracy.item())
    # all True is no mask; the gradient of the masked-out slot comes from L_E only
    same = mlpo_loss(MC, pr, ZC, zr, gamma=0.5, weights=w, implicit_mask=torch.ones(1, 4, dtype=torch.bool),
                     explicit=True, implicit=True)
    assert same.to_dict() == pytest.approx(everything.to_dict())
    grad_pr = pr.clone().requires_grad_(True)
    mlpo_loss(MC, grad_pr, ZC, zr, gamma=0.5, weights=w, implicit_mask=ranked, explicit=False, implicit=True).loss.backward()
    assert grad_pr.grad[0, 3].item() == 0.0 and grad_pr.grad[0, :3].abs().sum() > 0


def test_implicit_mask_leaving_no_pair_gives_nan_ranking() -> None:
    ranked = torch.tensor([[True, False]])  # one textual + one visual: nothing to rank
    out = mlpo_loss(MC, t([[1.0, 0.0]]), ZC, torch.zeros(1, 2), implicit_mask=ranked, gamma=0.5,
                    explicit=True, implicit=True)
    assert out.implicit.item() == 0.0
    assert out.to_dict()["ranking_accuracy"] is None
    assert out.explicit.item() == pytest.approx(neg_logsig(0.5) + neg_logsig(1.0), abs=1e-6)
    with pytest.raises(ValueError, match="implicit_mask must be a bool"):
        mlpo_loss(MC, MR, ZC, ZR, implicit_mask=torch.ones(1, 3), gamma=0.1, explicit=True, implicit=True)
    with pytest.raises(ValueError, match="implicit_mask must have shape"):
        mlpo_loss(MC, MR, ZC, ZR, implicit_mask=torch.ones(1, 2, dtype=torch.bool), gamma=0.1, explicit=True,
                  implicit=True)


def test_ranking_accuracy_none_or_nan() -> None:
    mask = torch.tensor([[True, False]])
    out = mlpo_loss(MC, t([[1.0, 0.0]]), ZC, torch.zeros(1, 2), rejected_mask=mask, gamma=0.1, explicit=True, implicit=True)
    assert math.isnan(out.ranking_accuracy.item())
    assert out.to_dict()["ranking_accuracy"] is None


def test_gradient_reaches_only_policy() -> None:
    pc, pr = t([2.0, 1.0]).requires_grad_(), t([[1.0, 0.0], [0.5, 0.7]]).requires_grad_()
    rc, rr = torch.zeros(2, requires_grad=True), torch.zeros(2, 2, requires_grad=True)
    w = torch.ones(2, 2, requires_grad=True)
    out = mlpo_loss(pc, pr, rc, rr, weights=w, gamma=0.1, explicit=True, implicit=True)
    out.loss.backward()
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.abs().sum() > 0 and pr.grad.abs().sum() > 0
    assert rc.grad is None and rr.grad is None and w.grad is None
    assert not out.reward_margin.requires_grad and not out.reward_accuracy.requires_grad


def test_errors() -> None:
    with pytest.raises(ValueError, match="both off"):
        mlpo_loss(MC, MR, ZC, ZR, explicit=False, implicit=False, gamma=0.1)
    with pytest.raises(ValueError, match="rejected"):
        mlpo_loss(MC, MR, ZC, torch.zeros(1, 2), gamma=0.1, explicit=True, implicit=True)
    with pytest.raises(ValueError, match="chosen"):
        mlpo_loss(t([1.0, 2.0]), MR, t([0.0, 0.0]), ZR, gamma=0.1, explicit=True, implicit=True)
    with pytest.raises(ValueError, match="weights"):
        mlpo_loss(MC, MR, ZC, ZR, weights=torch.ones(3), gamma=0.1, explicit=True, implicit=True)
    with pytest.raises(ValueError, match="bool"):
        mlpo_loss(MC, MR, ZC, ZR, rejected_mask=torch.ones(1, 3), gamma=0.1, explicit=True, implicit=True)
    with pytest.raises(ValueError, match="at least two"):
        mlpo_loss(MC, MR[:, :1], ZC, ZR[:, :1], explicit=False, gamma=0.1, implicit=True)
    with pytest.raises(ValueError, match="rejected"):
        dpo_loss(PC, PR[:1], RC, RR, gamma=0.1)
