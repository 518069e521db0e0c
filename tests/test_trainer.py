"""The training loop on a tiny real detector and tiny generated images: schedule, resume, NaN, stopping."""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import TINY_TRAINING, make_voc_dataset

from visionautoml.config import TrainingParameters
from visionautoml.data.formats import read_dataset
from visionautoml.errors import TrainingError
from visionautoml.evaluation.scoring import evaluate_predictions
from visionautoml.models.zoo import build_model
from visionautoml.training import trainer
from visionautoml.training.dataset import make_data_loader
from visionautoml.training.evaluate import predict_loader
from visionautoml.training.trainer import (
    build_optimizer,
    checkpoint_paths,
    epochs_that_fit,
    fit,
    learning_rate_factor,
    seed_everything,
)

TINY = TINY_TRAINING
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = make_voc_dataset(tmp_path_factory.mktemp("trainer") / "voc", n_images=8)
    return read_dataset(root)


def make_params(**overrides) -> TrainingParameters:
    return TrainingParameters(**{**TINY, **overrides})


def make_model(params: TrainingParameters, num_classes: int = 3) -> torch.nn.Module:
    seed_everything(params.seed)
    return build_model(params.model_name, num_classes, params)


def real_evaluate(dataset, params):
    loader = make_data_loader(dataset, params, train=False)

    def evaluate(module):
        truths, found = predict_loader(module, loader, "cpu")
        return evaluate_predictions(truths, found, dataset.classes, params).metrics

    return evaluate


def scripted_evaluate(values: list[float]):
    """An evaluate callback that reports the given primary metric values in turn."""
    remaining = list(values)
    return lambda module: {"mean_average_precision": remaining.pop(0)}


def test_optimizers_take_the_cloud_service_names():
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(parameters, make_params(optimizer="sgd", momentum=0.8, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    no_momentum = build_optimizer(parameters, make_params(optimizer="sgd", momentum=0.0, nesterov=True))
    assert not no_momentum.defaults["nesterov"]  # torch refuses nesterov without momentum
    adam = build_optimizer(
        parameters, make_params(optimizer="adam", beta1=0.8, beta2=0.99, ams_gradient=True)
    )
    assert (
        type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.8, 0.99) and adam.defaults["amsgrad"]
    )
    adamw = build_optimizer(parameters, make_params(optimizer="adamw", weight_decay=0.05))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05


def test_weight_decay_applies_to_weights_not_to_biases_and_norm_scales():
    layers = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = build_optimizer(layers.parameters(), make_params(optimizer="sgd", weight_decay=0.01))
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    conv, norm = layers
    assert decay[id(conv.weight)] == 0.01
    assert decay[id(conv.bias)] == decay[id(norm.weight)] == decay[id(norm.bias)] == 0.0


def test_warmup_cosine_rises_linearly_then_decays_to_the_cycles_end():
    params = make_params(number_of_epochs=10, warmup_cosine_lr_warmup_epochs=2, warmup_cosine_lr_cycles=0.45)
    factor = learning_rate_factor(params, steps_per_epoch=5)
    warmup = [factor(step) for step in range(10)]
    assert warmup == sorted(warmup) and warmup[0] == pytest.approx(1 / 11)
    assert factor(10) == pytest.approx(1.0)
    decay = [factor(step) for step in range(10, 50)]
    assert decay == sorted(decay, reverse=True)
    assert factor(50) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))


def test_step_schedule_multiplies_by_gamma_every_step_size_epochs():
    params = make_params(learning_rate_scheduler="step", step_lr_step_size=2, step_lr_gamma=0.1)
    factor = learning_rate_factor(params, steps_per_epoch=3)
    assert [factor(step) for step in (0, 5, 6, 11, 12)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tiny_data, tmp_path):
    params = make_params(number_of_epochs=2)
    evaluate = real_evaluate(tiny_data, params)
    straight = make_model(params)
    result = fit(straight, make_data_loader(tiny_data, params, train=True), evaluate, params, tmp_path / "a")
    assert result.epochs_completed == 2 and result.resumed_from_epoch is None

    def interrupt(epoch, losses):
        if epoch == 2:
            raise KeyboardInterrupt

    interrupted = make_model(params)
    with pytest.raises(KeyboardInterrupt):
        fit(
            interrupted,
            make_data_loader(tiny_data, params, train=True),
            evaluate,
            params,
            tmp_path / "b",
            on_epoch=interrupt,
        )
    resumed = make_model(params)
    outcome = fit(resumed, make_data_loader(tiny_data, params, train=True), evaluate, params, tmp_path / "b")
    assert outcome.resumed_from_epoch == 1 and outcome.epochs_completed == 2
    assert [entry["epoch"] for entry in outcome.history] == [2]
    last = torch.load(checkpoint_paths(tmp_path / "a")[1], weights_only=True)["model"]
    resumed_last = torch.load(checkpoint_paths(tmp_path / "b")[1], weights_only=True)["model"]
    for name, tensor in last.items():
        assert torch.allclose(tensor.float(), resumed_last[name].float(), atol=1e-6), name
    assert outcome.best_metrics == result.best_metrics


def test_a_nan_loss_fails_naming_epoch_iteration_and_learning_rate(tiny_data, tmp_path):
    poisoned = {
        name: torch.full_like(tensor, float("nan")) if tensor.is_floating_point() else tensor
        for name, tensor in make_model(make_params()).state_dict().items()
    }
    torch.save(poisoned, tmp_path / "nan.pt")
    params = make_params(pretrained=str(tmp_path / "nan.pt"), learning_rate=0.01)
    model = build_model(params.model_name, 3, params)
    loader = make_data_loader(tiny_data, params, train=True)
    with pytest.raises(TrainingError) as error:
        fit(model, loader, scripted_evaluate([0.0]), params, tmp_path / "run")
    message = str(error.value)
    assert "nan at epoch 1, iteration 1" in message
    assert "Lower learning_rate (now 0.01)" in message


def test_early_stopping_keeps_the_best_weights_and_counts_optimizer_steps(tiny_data, tmp_path):
    params = make_params(
        number_of_epochs=6,
        early_stopping=True,
        early_stopping_patience=2,
        early_stopping_delay=2,
        gradient_accumulation_step=2,
        training_batch_size=2,
    )
    model = make_model(params)
    loader = make_data_loader(tiny_data, params, train=True)  # 4 batches -> 2 optimizer steps an epoch
    seen = []
    result = fit(
        model,
        loader,
        scripted_evaluate([0.2, 0.5, 0.4, 0.3, 0.9, 0.9]),
        params,
        tmp_path,
        on_evaluation=lambda epoch, metrics: seen.append(epoch),
    )
    assert result.stop_reason == "early_stopping"
    assert seen == [1, 2, 3, 4] and result.best_epoch == 2
    assert result.best_metrics["mean_average_precision"] == 0.5
    best, last = checkpoint_paths(tmp_path)
    best_weights = torch.load(best, weights_only=True)["model"]
    current = model.state_dict()
    assert all(torch.equal(current[name], tensor) for name, tensor in best_weights.items())
    assert torch.load(last, weights_only=True)["scheduler"]["last_epoch"] == 4 * 2


def test_caller_stop_and_time_budget_end_training_after_an_evaluation(tiny_data, tmp_path):
    params = make_params(number_of_epochs=5, evaluation_frequency=2)
    loader = make_data_loader(tiny_data, params, train=True)
    stopped = fit(
        make_model(params),
        loader,
        scripted_evaluate([0.1, 0.2]),
        params,
        tmp_path / "stop",
        on_evaluation=lambda epoch, metrics: epoch == 2,
    )
    assert (stopped.stop_reason, stopped.epochs_completed) == ("stopped_by_caller", 2)
    assert [entry["epoch"] for entry in stopped.history if "mean_average_precision" in entry] == [2]

    hurried = make_params(number_of_epochs=5, evaluation_frequency=3, max_minutes=1e-6)
    evaluated = []
    result = fit(
        make_model(hurried),
        make_data_loader(tiny_data, hurried, train=True),
        scripted_evaluate([0.3]),
        hurried,
        tmp_path / "budget",
        on_evaluation=lambda epoch, metrics: evaluated.append(metrics),
    )
    assert (result.stop_reason, result.epochs_completed, result.best_epoch) == ("time_budget", 1, 1)
    assert len(evaluated) == 1 and evaluated[0]["mean_average_precision"] == 0.3


class FakeClock:
    """The trainer's clock, moved on by the loader: epochs of an exact length on any machine."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class SlowLoader:
    """A real loader whose batches each take ``seconds`` of the fake clock."""

    def __init__(self, loader, clock: FakeClock, seconds: float) -> None:
        self.loader, self.clock, self.seconds = loader, clock, seconds

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.clock.now += self.seconds
            yield batch


def test_a_time_budget_replans_the_schedule_to_end_inside_it(tiny_data, tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(trainer, "time", clock)
    params = make_params(number_of_epochs=100, evaluation_frequency=1, max_minutes=0.1)
    loader = SlowLoader(make_data_loader(tiny_data, params, train=True), clock, seconds=0.5)
    assert len(loader) == 2  # 2 s an epoch (1 s of training, 1 s recomputing batch norms) in 6 s
    result = fit(make_model(params), loader, scripted_evaluate([0.1] * 100), params, tmp_path)
    # Re-planned to the 3 epochs that fit (a tenth of an epoch kept for the last evaluation), so the
    # learning rate has annealed to (nearly) zero by the end instead of being cut off near its peak.
    assert (result.epochs_completed, result.stop_reason) == (3, "completed")
    assert result.history[-1]["lr"] < 0.05 * params.learning_rate
    assert torch.load(checkpoint_paths(tmp_path)[1], weights_only=True)["planned_epochs"] == 3


def test_epochs_that_fit_come_from_the_mean_epoch_time_and_never_exceed_number_of_epochs():
    params = make_params(number_of_epochs=30)
    in_95_seconds = time.monotonic() + 95
    assert epochs_that_fit(params, 4, 4, 40.0, in_95_seconds) == 4 + 9  # 10 s an epoch
    assert epochs_that_fit(params, 4, 4, 4.0, in_95_seconds) == 30  # 95 would fit
    assert epochs_that_fit(params, 4, 4, 400.0, in_95_seconds) == 4  # not one more: end now


def test_an_unusable_checkpoint_says_how_to_start_over(tiny_data, tmp_path):
    params = make_params()
    _, last = checkpoint_paths(tmp_path)
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match=f"Delete the folder {tmp_path}"):
        fit(make_model(params), make_data_loader(tiny_data, params, train=True), None, params, tmp_path)


def test_empty_training_data_is_refused(tmp_path):
    params = make_params()
    with pytest.raises(TrainingError, match="training data is empty"):
        fit(make_model(params), [], scripted_evaluate([]), params, tmp_path)


def test_checkpoints_are_state_dicts_loadable_with_weights_only(tiny_data, tmp_path):
    params = make_params(number_of_epochs=1)
    fit(
        make_model(params),
        make_data_loader(tiny_data, params, train=True),
        scripted_evaluate([0.1]),
        params,
        tmp_path,
    )
    best, last = checkpoint_paths(tmp_path)
    state = torch.load(last, weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "epoch", "best_metric", "best_epoch"}
    assert state["epoch"] == 1 and state["best_metric"] == 0.1
    assert torch.load(best, weights_only=True)["epoch"] == 1
