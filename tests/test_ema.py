"""The moving average of the weights (smca_d2/engine/ema.py): its arithmetic, swapping it into the
model, checkpointing it, and loading it for inference."""

import itertools
import logging

import pytest
import torch
from torch import nn

from smca_d2.checkpoint import EMA_KEY, SafeCheckpointer
from smca_d2.engine import EMAHook, ModelEMA, use_ema_weights

from detectron2.engine import SimpleTrainer, hooks


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def train_steps(model, n, seed=1):
    """`n` SGD steps on random data (the batch norm statistics change too)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(n):
        loss = model(torch.randn(4, 3, 8, 8, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield


def trained_with_ema(steps, decay=0.5):
    """A small model after `steps` training steps, and the average updated after each."""
    model = small_model()
    ema = ModelEMA(model, decay=decay)
    for _ in train_steps(model, steps):
        ema.update()
    return model, ema


def test_average_follows_the_formula():
    model = small_model()
    ema = ModelEMA(model, decay=0.9)
    reference = {k: v.clone().double() for k, v in model.state_dict().items()}
    for t, _ in enumerate(train_steps(model, 25)):
        d = min(0.9, (1 + t) / (10 + t))
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        for k, v in model.state_dict().items():
            reference[k] = d * reference[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone().double()
    assert ema.num_updates == 25
    state = ema.state_dict()
    for k, v in state.items():
        assert v.dtype == model.state_dict()[k].dtype
        torch.testing.assert_close(v.double(), reference[k], rtol=1e-5, atol=1e-6, msg=k)
    # integer buffers are copied, not averaged; floating-point ones differ from the weights
    assert torch.equal(state["1.num_batches_tracked"], torch.tensor(25))
    assert not torch.equal(state["1.running_mean"], model.state_dict()["1.running_mean"])


def test_decay_must_be_in_the_open_unit_interval():
    for decay in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="decay"):
            ModelEMA(small_model(), decay=decay)


def test_weights_in_model_swaps_and_restores():
    model, ema = trained_with_ema(5)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]  # the optimizer's tensors stay the same objects
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    with ema.weights_in_model() as swapped:
        assert swapped is model
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema.state_dict()[k]), k
        out_ema = model(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert [id(p) for p in model.parameters()] == params
    assert not torch.allclose(out_ema, model(x))


def test_weights_in_model_restores_after_an_error():
    model, ema = trained_with_ema(3)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), ema.weights_in_model():
        raise RuntimeError("boom")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_load_state_dict_refuses_weights_of_another_model():
    ema = ModelEMA(small_model())
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(KeyError, match="do not fit"):
        ema.load_state_dict(other.state_dict())
    wrong = dict(small_model().state_dict().items())
    wrong["4.weight"] = torch.zeros(3, 144)
    with pytest.raises(ValueError, match="4.weight"):
        ema.load_state_dict(wrong)
    assert not ema.restored


class _Data:
    """A stream of random batches; `start` skips the first ones (a resumed run's stream)."""

    def __init__(self, start=0):
        self.start = start

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for i in itertools.count():
            x = torch.randn(4, 3, 8, 8, generator=gen)
            if i >= self.start:
                yield x


class _LossModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = small_model()

    def forward(self, x):
        return {"loss": self.net(x).square().mean()}


def _trainer(model, start=0):
    return SimpleTrainer(model, _Data(start), torch.optim.SGD(model.parameters(), lr=0.1))


def test_hook_starts_from_the_weights_training_starts_with():
    """The average begins with the weights loaded after the hook was made (train.init_checkpoint)."""
    model = _LossModel()
    ema = ModelEMA(model, decay=0.99)
    trainer = _trainer(model)
    trainer.register_hooks([EMAHook(ema)])
    init = {k: v + 1.0 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(init)  # what loading train.init_checkpoint does
    trainer.train(0, 1)
    assert ema.num_updates == 1
    # decay 1/10 at the first update: the average is 0.1 * init + 0.9 * (weights after the step)
    after = model.state_dict()
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.1 * init[k] + 0.9 * after[k], msg=k)


def test_checkpoint_resume_continues_the_average(tmp_path):
    """Saved by the checkpointer (weights) and the trainer (count); resuming gives the same
    average as an uninterrupted run."""

    def run(out, max_iter, resume=False, start=0):
        torch.manual_seed(0)
        model = _LossModel()
        ema = ModelEMA(model, decay=0.9)
        trainer = _trainer(model, start)
        checkpointer = SafeCheckpointer(model, str(out), trainer=trainer, **{EMA_KEY: ema})
        trainer.register_hooks([EMAHook(ema), hooks.PeriodicCheckpointer(checkpointer, period=3)])
        checkpointer.resume_or_load("", resume=resume)
        assert ema.restored == resume
        trainer.train(trainer.iter + 1 if resume else 0, max_iter)
        return ema

    uninterrupted = run(tmp_path / "a", 6).state_dict()

    run(tmp_path / "b", 3)  # stops after iteration 2 (checkpoint model_final, iteration 2)
    saved = torch.load(tmp_path / "b" / "model_final.pth", weights_only=True)
    assert saved[EMA_KEY].keys() == saved["model"].keys()
    assert saved["trainer"]["hooks"]["EMAHook"] == {"num_updates": 3}

    ema = run(tmp_path / "b", 6, resume=True, start=3)  # a new process: fresh model, resumed
    assert ema.num_updates == 6
    for k, v in uninterrupted.items():
        torch.testing.assert_close(ema.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_checkpointer_loads_the_averaged_weights_for_inference(tmp_path, caplog):
    model, ema = trained_with_ema(3)
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), EMA_KEY: ema.state_dict()}, path)

    fresh = small_model(seed=5)
    SafeCheckpointer(fresh, ema_weights=True).load(str(path))
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in fresh.state_dict().items())
    fresh = small_model(seed=5)
    SafeCheckpointer(fresh).load(str(path))  # by default: the trained weights
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())

    plain = tmp_path / "plain.pth"
    torch.save({"model": model.state_dict()}, plain)
    fresh = small_model(seed=5)
    with caplog.at_level(logging.WARNING):
        SafeCheckpointer(fresh, ema_weights=True).load(str(plain))
    assert "has no averaged (EMA) weights" in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_use_ema_weights_reads_the_config():
    from omegaconf import OmegaConf

    assert use_ema_weights(OmegaConf.create({"train": {"ema": {"enabled": True, "decay": 0.9}}}))
    assert not use_ema_weights(OmegaConf.create({"train": {"ema": {"enabled": False}}}))
    assert not use_ema_weights(OmegaConf.create({"train": {}}))  # configs written before EMA existed
    assert not use_ema_weights(OmegaConf.create({}))
