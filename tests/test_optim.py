"""Learning-rate schedule from the sched config."""

from __future__ import annotations

import pytest

from zipfls_train.engine.optim import milestone_epochs


def test_milestone_fractions_round_half_up_and_never_to_epoch_zero():
    assert milestone_epochs([0.5, 0.75], 200) == [100, 150]
    assert milestone_epochs([0.3, 0.6, 0.9], 100) == [30, 60, 90]
    assert milestone_epochs([0.5, 0.75], 2) == [1, 2]
    assert milestone_epochs([0.5, 0.75], 1) == [1, 1]  # a 1-epoch run trains at the base lr
    assert milestone_epochs([100, 150], 200) == [100, 150]
    with pytest.raises(ValueError, match="sched.milestones"):
        milestone_epochs([0.5, 150], 200)
