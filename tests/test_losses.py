"""Every loss against a value worked out by hand from small embeddings with known dot products.

The expected values are closed-form expressions (math.log / math.exp over the listed
logits), never the vectorised formula run again, so a wrong sign, axis or offset shows up.
"""

from __future__ import annotations

import math

import pytest
import torch

from medalign.losses import (
    ContrastiveLoss,
    clip_loss,
    dcl_loss,
    gather_with_grad,
    local_alignment_loss,
    siglip_loss,
    soft_targets_from_labels,
    soft_targets_from_similarity,
)

# Three pairs in 2-D; M[i][j] = image_i . text_j is
#   [[1.0, 0.6, 0.0],
#    [0.0, 0.8, 1.0],
#    [0.6, 1.0, 0.8]]
# (asymmetric, and image 2 prefers text 1 over its own text 2).
IMAGES3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
TEXTS3 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)

# Two pairs; M = [[1.0, 0.6], [0.0, 0.8]].
IMAGES2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
TEXTS2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)

E = math.exp


def lse(*xs: float) -> float:
    return math.log(sum(E(x) for x in xs))


def test_gather_is_identity_without_distributed() -> None:
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


# --------------------------------------------------------------------------- clip
def test_clip_loss_hard_targets_by_hand() -> None:
    # scale 2: logits = 2 M.
    rows = [-2.0 + lse(2.0, 1.2, 0.0), -1.6 + lse(0.0, 1.6, 2.0), -1.6 + lse(1.2, 2.0, 1.6)]
    cols = [-2.0 + lse(2.0, 0.0, 1.2), -1.6 + lse(1.2, 1.6, 2.0), -1.6 + lse(0.0, 2.0, 1.6)]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    got = clip_loss(IMAGES3, TEXTS3, torch.tensor(2.0, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # the identity as soft targets is the hard loss
    eye = torch.eye(3, dtype=torch.float64)
    assert clip_loss(IMAGES3, TEXTS3, 2.0, targets=eye).item() == pytest.approx(expected, abs=1e-12)


def test_clip_loss_orthogonal_closed_form() -> None:
    s = 3.0
    got = clip_loss(IMAGES2, IMAGES2, torch.tensor(s))
    assert got.item() == pytest.approx(math.log(1 + E(-s)), abs=1e-6)


def test_clip_loss_soft_targets_by_hand() -> None:
    # scale 1, logits = M = [[1, .6], [0, .8]]; targets T = [[.5, .5], [0, 1]].
    targets = torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    i2t_row0 = -(0.5 * (1.0 - lse(1.0, 0.6)) + 0.5 * (0.6 - lse(1.0, 0.6)))
    i2t_row1 = -(0.8 - lse(0.0, 0.8))
    # text->image uses the columns of T, renormalised: text0 -> [1, 0], text1 -> [1/3, 2/3];
    # text0 scores images [M00, M10] = [1, 0], text1 scores [M01, M11] = [.6, .8].
    t2i_row0 = -(1.0 - lse(1.0, 0.0))
    t2i_row1 = -((1 / 3) * (0.6 - lse(0.6, 0.8)) + (2 / 3) * (0.8 - lse(0.6, 0.8)))
    expected = 0.5 * ((i2t_row0 + i2t_row1) / 2 + (t2i_row0 + t2i_row1) / 2)
    got = clip_loss(IMAGES2, TEXTS2, 1.0, targets=targets)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_clip_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(IMAGES3, TEXTS2, 1.0)
    with pytest.raises(ValueError, match="targets"):
        clip_loss(IMAGES2, TEXTS2, 1.0, targets=torch.ones(2, 3) / 3)


# --------------------------------------------------------------------------- siglip
def test_siglip_loss_by_hand() -> None:
    # t = 2, b = -1: logits = 2 M - 1 = [[1, .2], [-1, .6]]; -log sigmoid(x) = log(1 + e^-x).
    pairs = [(+1, 1.0), (-1, 0.2), (-1, -1.0), (+1, 0.6)]
    expected = sum(math.log(1 + E(-z * x)) for z, x in pairs) / 2  # normalised by B, not B^2
    got = siglip_loss(
        IMAGES2, TEXTS2, torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    )
    assert got.item() == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- dcl
def test_dcl_loss_by_hand() -> None:
    # scale 2 on the 3-pair M, positive left out of each log-sum-exp.
    rows = [-2.0 + lse(1.2, 0.0), -1.6 + lse(0.0, 2.0), -1.6 + lse(1.2, 2.0)]
    cols = [-2.0 + lse(0.0, 1.2), -1.6 + lse(1.2, 2.0), -1.6 + lse(0.0, 2.0)]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    got = dcl_loss(IMAGES3, TEXTS3, torch.tensor(2.0, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_dcl_needs_a_negative() -> None:
    with pytest.raises(ValueError, match="two pairs"):
        dcl_loss(IMAGES2[:1], TEXTS2[:1], 1.0)


# --------------------------------------------------------------------------- soft targets
def test_soft_targets_from_labels() -> None:
    got = soft_targets_from_labels(torch.tensor([0, 1, 0, -1, -1]))
    expected = torch.tensor(
        [
            [0.5, 0, 0.5, 0, 0],
            [0, 1, 0, 0, 0],
            [0.5, 0, 0.5, 0, 0],
            [0, 0, 0, 1, 0],  # unknowns match only themselves, not each other
            [0, 0, 0, 0, 1],
        ]
    )
    torch.testing.assert_close(got, expected)


def test_soft_targets_from_labels_against_gathered_columns() -> None:
    # this rank holds global rows 2 and 3 of labels_all = [1, 0, 0, -1]
    got = soft_targets_from_labels(torch.tensor([0, -1]), torch.tensor([1, 0, 0, -1]), offset=2)
    torch.testing.assert_close(got, torch.tensor([[0, 0.5, 0.5, 0], [0, 0, 0, 1.0]]))


def test_soft_targets_from_similarity_by_hand() -> None:
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    got = soft_targets_from_similarity(text, temperature=0.5, mix=0.5)
    # sim / 0.5 = [[2, 2, 0], [2, 2, 0], [0, 0, 2]]
    z01 = 2 * E(2) + 1
    z2 = 2 + E(2)
    expected = torch.tensor(
        [
            [0.5 + 0.5 * E(2) / z01, 0.5 * E(2) / z01, 0.5 / z01],
            [0.5 * E(2) / z01, 0.5 + 0.5 * E(2) / z01, 0.5 / z01],
            [0.5 / z2, 0.5 / z2, 0.5 + 0.5 * E(2) / z2],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
    # the identical texts 0 and 1 receive equal mass from a third row
    assert got[2, 0].item() == pytest.approx(got[2, 1].item())


def test_soft_targets_from_similarity_validates() -> None:
    with pytest.raises(ValueError, match="mix"):
        soft_targets_from_similarity(TEXTS2, mix=1.5)
    with pytest.raises(ValueError, match="temperature"):
        soft_targets_from_similarity(TEXTS2, temperature=0.0)


# --------------------------------------------------------------------------- local alignment
def _local_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # image 0: orthogonal regions (1,0), (0,1); image 1: both regions (1,0), so its context is (1,0).
    image_tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    # text 0: word (1,0) and a padded word; text 1: words (0,1) and (.6,.8).
    text_tokens = torch.tensor([[[1.0, 0.0], [0.3, -0.7]], [[0.0, 1.0], [0.6, 0.8]]], dtype=torch.float64)
    text_mask = torch.tensor([[True, False], [True, True]])
    return image_tokens, text_tokens, text_mask


def _local_expected(scale: float = 10.0, tau: float = 4.0, gamma: float = 5.0) -> float:
    def cos_on_image0(a: float, b: float) -> float:
        # word (a, b) attends over regions (1,0), (0,1) with weights p, 1 - p; context (p, 1 - p)
        p = E(tau * a) / (E(tau * a) + E(tau * b))
        return (a * p + b * (1 - p)) / math.sqrt(p**2 + (1 - p) ** 2)

    def smooth_max(*cosines: float) -> float:
        return math.log(sum(E(gamma * c) for c in cosines)) / gamma

    s00 = smooth_max(cos_on_image0(1.0, 0.0))
    s01 = smooth_max(cos_on_image0(0.0, 1.0), cos_on_image0(0.6, 0.8))
    s10 = smooth_max(1.0)  # word (1,0) vs context (1,0)
    s11 = smooth_max(0.0, 0.6)
    logits = [[scale * s00, scale * s01], [scale * s10, scale * s11]]
    rows = [lse(*logits[0]) - logits[0][0], lse(*logits[1]) - logits[1][1]]
    cols = [lse(logits[0][0], logits[1][0]) - logits[0][0], lse(logits[0][1], logits[1][1]) - logits[1][1]]
    return 0.5 * (sum(rows) / 2 + sum(cols) / 2)


def test_local_alignment_loss_by_hand() -> None:
    image_tokens, text_tokens, text_mask = _local_inputs()
    got = local_alignment_loss(image_tokens, text_tokens, text_mask, 10.0)
    assert got.item() == pytest.approx(_local_expected(), abs=1e-10)
    # token norms do not matter: tokens are normalised inside
    got_scaled = local_alignment_loss(3 * image_tokens, 0.5 * text_tokens, text_mask, 10.0)
    assert got_scaled.item() == pytest.approx(_local_expected(), abs=1e-10)


def test_local_alignment_default_scale_is_gloria_temp3_times_temp2() -> None:
    """GLoRIA scales log(sum exp(temp2 * cos)) by temp3 = 10; with the 1/gamma kept inside, that is
    a logit scale of 10 * 5 = 50, not 10 (which would be 5x softer than the method it cites)."""
    inputs = _local_inputs()
    assert local_alignment_loss(*inputs).item() == pytest.approx(_local_expected(scale=50.0), abs=1e-10)
    assert local_alignment_loss(*inputs).item() != pytest.approx(_local_expected(scale=10.0), abs=1e-3)
    assert ContrastiveLoss("clip", local_weight=1.0).local_logit_scale is None  # follows gamma


def test_local_alignment_padded_word_changes_nothing() -> None:
    image_tokens, text_tokens, text_mask = _local_inputs()
    base = local_alignment_loss(image_tokens, text_tokens, text_mask)
    altered = text_tokens.clone()
    altered[0, 1] = torch.tensor([-5.0, 9.0], dtype=torch.float64)
    altered.requires_grad_(True)
    loss = local_alignment_loss(image_tokens, altered, text_mask)
    assert loss.item() == pytest.approx(base.item(), abs=1e-12)
    loss.backward()
    assert altered.grad is not None
    assert torch.all(altered.grad[0, 1] == 0)
    assert altered.grad[1].abs().sum() > 0


def test_local_alignment_rejects_all_padding_text() -> None:
    image_tokens, text_tokens, _ = _local_inputs()
    with pytest.raises(ValueError, match="unmasked"):
        local_alignment_loss(image_tokens, text_tokens, torch.tensor([[False, False], [True, True]]))


# --------------------------------------------------------------------------- gradients
def test_gradient_reaches_logit_scale_by_hand() -> None:
    # orthogonal pairs: loss = log(1 + e^-s), s = exp(log_s) so d/dlog_s = -s e^-s / (1 + e^-s)
    log_s = torch.tensor(math.log(2.0), dtype=torch.float64, requires_grad=True)
    clip_loss(IMAGES2, IMAGES2, log_s.exp()).backward()
    s = 2.0
    assert log_s.grad is not None
    assert log_s.grad.item() == pytest.approx(-s * E(-s) / (1 + E(-s)), abs=1e-12)


@pytest.mark.parametrize("kind", ["siglip", "dcl", "local"])
def test_gradient_reaches_scale_and_bias(kind: str) -> None:
    log_s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    if kind == "siglip":
        siglip_loss(IMAGES3, TEXTS3, log_s.exp(), bias).backward()
        assert bias.grad is not None and bias.grad.item() != 0
    elif kind == "dcl":
        dcl_loss(IMAGES3, TEXTS3, log_s.exp()).backward()
    else:
        local_alignment_loss(*_local_inputs(), log_s.exp()).backward()
    assert log_s.grad is not None and log_s.grad.item() != 0


# --------------------------------------------------------------------------- wrapper
def _outputs(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "image_embeds": IMAGES2,
        "text_embeds": TEXTS2,
        "logit_scale": torch.tensor(1.0, dtype=torch.float64),
        "logit_bias": torch.tensor(-1.0, dtype=torch.float64),
        **extra,
    }


def test_wrapper_clip_with_label_targets_by_hand() -> None:
    # both pairs share label 3 -> every row's target is [.5, .5]; logits = M = [[1, .6], [0, .8]]
    rows = [lse(1.0, 0.6) - 0.5 * (1.0 + 0.6), lse(0.0, 0.8) - 0.5 * (0.0 + 0.8)]
    cols = [lse(1.0, 0.0) - 0.5 * (1.0 + 0.0), lse(0.6, 0.8) - 0.5 * (0.6 + 0.8)]
    expected = 0.5 * (sum(rows) / 2 + sum(cols) / 2)
    out = ContrastiveLoss("clip", soft_targets="labels")(_outputs(), labels=torch.tensor([3, 3]))
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert set(out) == {"loss", "loss_clip", "logit_scale"}
    # distinct labels reduce to the hard loss
    hard = ContrastiveLoss("clip", soft_targets="labels")(_outputs(), labels=torch.tensor([0, 1]))
    assert hard["loss"].item() == pytest.approx(clip_loss(IMAGES2, TEXTS2, 1.0).item(), abs=1e-6)


def test_wrapper_kinds_and_local_term() -> None:
    image_tokens, text_tokens, text_mask = _local_inputs()
    outputs = _outputs(image_tokens=image_tokens, text_tokens=text_tokens, text_mask=text_mask)
    siglip_expected = (
        sum(math.log(1 + E(-z * x)) for z, x in [(1, 0.0), (-1, -0.4), (-1, -1.0), (1, -0.2)]) / 2
    )
    out = ContrastiveLoss("siglip", local_weight=0.5)(outputs)
    local = _local_expected(scale=50.0)  # GLoRIA's default scale
    assert out["loss_siglip"].item() == pytest.approx(siglip_expected, abs=1e-12)
    assert out["loss_local"].item() == pytest.approx(local, abs=1e-10)
    assert out["loss"].item() == pytest.approx(siglip_expected + 0.5 * local, abs=1e-10)
    assert not out["loss_local"].requires_grad

    dcl = ContrastiveLoss("dcl")(_outputs())
    # B = 2: each row's only negative; logits = M
    expected_dcl = 0.5 * (((0.6 - 1.0) + (0.0 - 0.8)) / 2 + ((0.0 - 1.0) + (0.6 - 0.8)) / 2)
    assert dcl["loss"].item() == pytest.approx(expected_dcl, abs=1e-12)


def test_wrapper_text_targets_and_gradient() -> None:
    image = IMAGES2.clone().requires_grad_(True)
    out = ContrastiveLoss("clip", soft_targets="text", soft_target_mix=0.0)(_outputs(image_embeds=image))
    # mix = 0 leaves the identity: the hard loss
    assert out["loss"].item() == pytest.approx(clip_loss(IMAGES2, TEXTS2, 1.0).item(), abs=1e-12)
    out["loss"].backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_wrapper_errors() -> None:
    with pytest.raises(ValueError, match="kind"):
        ContrastiveLoss("triplet")
    with pytest.raises(ValueError, match="soft targets"):
        ContrastiveLoss("siglip", soft_targets="labels")
    with pytest.raises(ValueError, match="labels"):
        ContrastiveLoss("clip", soft_targets="labels")(_outputs())
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveLoss("siglip")(_outputs(logit_bias=None))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="text_tokens"):
        ContrastiveLoss("clip", local_weight=1.0)(_outputs())
