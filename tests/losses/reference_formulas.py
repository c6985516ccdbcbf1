"""Independent float64 evaluations of the papers' per-example losses, written from the equations (plain
Python `math`, one example at a time), for comparison with the loss functions of the emitted scripts.

Each preference formula takes one pair's summed log-probabilities c, r (chosen, rejected), reference
log-probabilities rc, rr, completion lengths nc, nr and the hyperparameters; it returns the loss.
"""

from __future__ import annotations

import math


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def dpo(c, r, rc, rr, nc, nr, hp):  # Rafailov et al. 2023, Eq. 7
    return -log_sigmoid(hp["beta"] * ((c - rc) - (r - rr)))


def ipo(c, r, rc, rr, nc, nr, hp):  # Azar et al. 2023, Eq. 17 with per-token log-ratios (TRL)
    return ((c - rc) / nc - (r - rr) / nr - 1 / (2 * hp["beta"])) ** 2


def cdpo(c, r, rc, rr, nc, nr, hp):  # Mitchell 2023
    h, eps = hp["beta"] * ((c - rc) - (r - rr)), hp["label_smoothing"]
    return -(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h)


def robust(c, r, rc, rr, nc, nr, hp):  # Chowdhury et al. 2024
    h, eps = hp["beta"] * ((c - rc) - (r - rr)), hp["label_smoothing"]
    return (-(1 - eps) * log_sigmoid(h) + eps * log_sigmoid(-h)) / (1 - 2 * eps)


def slic(c, r, rc, rr, nc, nr, hp):  # Zhao et al. 2023: hinge on sequence log-likelihoods + λ·NLL (summed)
    return max(0.0, hp["delta"] - c + r) - hp["regularization_weight"] * c


def nca(c, r, rc, rr, nc, nr, hp):  # Chen et al. 2024, K = 2
    rw, rl = hp["beta"] * (c - rc), hp["beta"] * (r - rr)
    return -log_sigmoid(rw) - 0.5 * log_sigmoid(-rw) - 0.5 * log_sigmoid(-rl)


def bco_pair(c, r, rc, rr, nc, nr, hp):  # Jung et al. 2024, with reward shift δ
    rw, rl, d = hp["beta"] * (c - rc), hp["beta"] * (r - rr), hp["delta"]
    return -log_sigmoid(rw - d) - log_sigmoid(-(rl - d))


def sppo_hard(c, r, rc, rr, nc, nr, hp):  # Wu et al. 2024, Eq. 4.7 with P = 1 / 0
    target = 1 / (2 * hp["beta"])
    return ((c - rc) - target) ** 2 + ((r - rr) + target) ** 2


def apo_zero(c, r, rc, rr, nc, nr, hp):  # D'Oosterlinck et al. 2024, Eq. 7
    return 1 - sigmoid(hp["beta"] * (c - rc)) + sigmoid(hp["beta"] * (r - rr))


def apo_down(c, r, rc, rr, nc, nr, hp):  # D'Oosterlinck et al. 2024, Eq. 8
    rw, rl = c - rc, r - rr
    return sigmoid(hp["beta"] * rw) + 1 - sigmoid(hp["beta"] * (rw - rl))


def simpo(c, r, rc, rr, nc, nr, hp):  # Meng et al. 2024
    return -log_sigmoid(hp["beta"] * c / nc - hp["beta"] * r / nr - hp["simpo_gamma"])


def cpo(c, r, rc, rr, nc, nr, hp):  # Xu et al. 2024: Eq. 3 + α·NLL, the NLL averaged over the chosen tokens
    return -log_sigmoid(hp["beta"] * (c - r)) + hp["cpo_alpha"] * (-c / nc)


def orpo(c, r, rc, rr, nc, nr, hp):  # Hong et al. 2024: SFT loss + λ·L_OR, P(y|x) the per-token geometric mean
    pw, pl = math.exp(c / nc), math.exp(r / nr)
    log_odds_ratio = math.log((pw / (1 - pw)) / (pl / (1 - pl)))
    return -c / nc - hp["beta"] * log_sigmoid(log_odds_ratio)


def rdpo(c, r, rc, rr, nc, nr, hp):  # Park et al. 2024
    return -log_sigmoid(hp["beta"] * (c - rc) - hp["beta"] * (r - rr) + hp["alpha"] * (nc - nr))


PREFERENCE = {
    "dpo": dpo,
    "ipo": ipo,
    "cdpo": cdpo,
    "robust-dpo": robust,
    "slic": slic,
    "nca": nca,
    "bco-pair": bco_pair,
    "sppo-hard": sppo_hard,
    "apo-zero": apo_zero,
    "apo-down": apo_down,
    "simpo": simpo,
    "cpo": cpo,
    "orpo": orpo,
    "rdpo": rdpo,
    "step-dpo": dpo,  # Step-DPO's loss is DPO's; the difference is the data (tests/methods/test_preference.py)
}


def kto(lp, rlp, desirable, hp):  # Ethayarajh et al. 2024: λ_y - v(x, y)
    r, z0, beta = lp - rlp, hp["kl"], hp["beta"]
    if desirable:
        return hp["desirable_weight"] * (1 - sigmoid(beta * (r - z0)))
    return hp["undesirable_weight"] * (1 - sigmoid(beta * (z0 - r)))


def bco(lp, rlp, desirable, hp):  # Jung et al. 2024, unpaired, with reward shift δ
    reward = hp["beta"] * (lp - rlp)
    return -log_sigmoid(reward - hp["delta"]) if desirable else -log_sigmoid(-(reward - hp["delta"]))


UNPAIRED = {"kto": kto, "bco": bco}
