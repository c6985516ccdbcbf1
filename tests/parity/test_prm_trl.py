"""Process reward models and TRL 1.16: there is nothing to compare against.

TRL shipped a PRMTrainer (trl.experimental.prm) up to 1.9.0 and removed it in 1.10.0; 1.16 has none. The
loss (token-classification cross-entropy over the labelled separator positions, mean over the batch's
labelled steps) is checked against an independent computation in tests/losses/test_prm_losses.py instead.
This test fails when a TRL release brings a PRM trainer back, so that a parity test gets written for it.
"""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.parity
trl = pytest.importorskip("trl")


def test_trl_has_no_prm_trainer():
    assert not hasattr(trl, "PRMTrainer") and not hasattr(trl, "PRMConfig")
    with pytest.raises(ImportError):
        importlib.import_module("trl.experimental.prm")
