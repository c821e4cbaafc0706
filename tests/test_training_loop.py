"""The training loop resumes exactly where it stopped."""

import numpy as np
import pytest
import torch

from swapmoe.models.tiny import build_tiny_model
from swapmoe.models.training.loop import TrainConfig, learning_rate, train


def batches(step: int) -> dict:
    rng = np.random.default_rng([0, step])
    ids = torch.from_numpy(rng.integers(3, 200, (2, 16)))
    return dict(input_ids=ids, labels=ids)


@pytest.mark.slow
def test_an_interrupted_run_resumed_from_its_checkpoint_ends_with_the_same_weights(tmp_path):
    config = TrainConfig(steps=6, warmup=2, checkpoint_every=3, threads=1)
    straight = build_tiny_model("mixtral")
    train(straight, batches, config, tmp_path / "straight", log=lambda _: None)

    def crash_at_step_4(step):
        if step == 4:
            raise KeyboardInterrupt  # the machine went away after the step-3 checkpoint
        return batches(step)

    with pytest.raises(KeyboardInterrupt):
        train(build_tiny_model("mixtral"), crash_at_step_4, config, tmp_path / "resumed", log=lambda _: None)
    resumed = build_tiny_model("mixtral")
    losses = train(resumed, batches, config, tmp_path / "resumed", log=lambda _: None)
    assert len(losses) == 3  # only the remaining steps ran
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(config, 0) == 0.1 and learning_rate(config, 9) == 1.0
    assert learning_rate(config, 99) < 0.11 and learning_rate(config, 50) < 1.0


@pytest.mark.slow
def test_a_parameter_groups_lr_scale_multiplies_its_learning_rate(tmp_path):
    model = build_tiny_model("mixtral")
    embeddings = model.get_input_embeddings().weight
    frozen = [p for p in model.parameters() if p is not embeddings]
    before = [p.detach().clone() for p in frozen]
    train(model, batches, TrainConfig(steps=2, warmup=1, threads=1), tmp_path,
          param_groups=[dict(params=[embeddings]), dict(params=frozen, lr_scale=0.0, weight_decay=0.0)],
          log=lambda _: None)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen))  # scaled to zero: untouched
    assert not torch.equal(embeddings, build_tiny_model("mixtral").get_input_embeddings().weight)
