"""Optimizers and schedules: parameter groups, lr scaling, and every schedule against torch's own
schedulers at every step."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import SGD, lr_scheduler

from resnet_train import create_model
from resnet_train.engine.trainer import fit
from resnet_train.optim import build_optimizer, build_scheduler, effective_lr
from tests.conftest import REPO, SMOKE, compose_config, run_cli
from tests.test_train import scalars


def test_norm_weights_and_biases_skip_weight_decay_by_default():
    model = create_model("resnet20")
    cfg = compose_config("optim=sgd", "optim.weight_decay=5e-4").optim
    optimizer = build_optimizer(cfg, model, cfg.lr)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 4 or p.ndim == 2 for p in decay["params"])  # conv and fc weights
    bn = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    }
    assert bn <= {id(p) for p in no_decay["params"]}
    assert id(model.fc.bias) in {id(p) for p in no_decay["params"]}
    everything = compose_config("optim.decay_norm_and_bias=true").optim
    (group,) = build_optimizer(everything, model, everything.lr).param_groups
    assert group["weight_decay"] == everything.weight_decay


def test_adamw_takes_its_settings():
    cfg = compose_config("optim=adamw", "optim.betas=[0.8,0.99]", "optim.eps=1e-6").optim
    optimizer = build_optimizer(cfg, create_model("resnet20"), cfg.lr)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        1e-3,
        (0.8, 0.99),
        1e-6,
        0.05,
    )


def test_linear_lr_scaling_uses_the_global_batch(tmp_path):
    cfg = compose_config("optim.lr_scaling=linear", "optim.lr=0.1").optim
    assert effective_lr(cfg, 1024) == pytest.approx(0.4)
    assert effective_lr(compose_config("optim.lr=0.1").optim, 1024) == 0.1
    result = run_cli(*SMOKE, "data.train_size=64", "optim.lr_scaling=linear", "optim.lr=0.1",
                     "data.batch_size=16", "trainer.accumulate_steps=2", "hydra.run.dir=run",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "global batch 32 (16 x 2 accumulation steps), learning rate 0.0125 " in result.stdout
    assert "(optim.lr 0.1 x 32/256)" in result.stdout


def _lrs(scheduler, optimizer, n: int) -> list[float]:
    values = []
    for _ in range(n):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def _fresh(lr: float = 0.1) -> SGD:
    return SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


# (overrides, epochs, steps per epoch, the same schedule built directly from torch's classes)
CASES = {
    "step per epoch": (
        ["schedule=step", "schedule.step_size=3", "schedule.gamma=0.5"], 10, 4,
        lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    ),
    "step per step": (
        ["schedule=step", "schedule.interval=step", "schedule.step_size=7"], 5, 4,
        lambda o: lr_scheduler.StepLR(o, step_size=7, gamma=0.1),
    ),
    "multistep": (
        ["schedule=multistep", "schedule.milestones=[3,7]", "schedule.gamma=0.2"], 10, 4,
        lambda o: lr_scheduler.MultiStepLR(o, milestones=[3, 7], gamma=0.2),
    ),
    "cosine per step": (
        ["schedule=cosine", "schedule.interval=step", "schedule.min_lr=0.001"], 6, 5,
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=30, eta_min=0.001),
    ),
    "cosine restarts": (
        ["schedule=cosine_restarts", "schedule.restart_period=3", "schedule.restart_mult=2"], 12, 3,
        lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    ),
    "onecycle": (
        ["schedule=onecycle"], 4, 10,
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=40),
    ),
    "warm-up + cosine": (
        ["schedule=cosine", "schedule.interval=step", "schedule.warmup=5",
         "schedule.warmup_start_factor=0.2"], 5, 6,
        lambda o: lr_scheduler.SequentialLR(o, [
            lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5),
            lr_scheduler.CosineAnnealingLR(o, T_max=25)], milestones=[5]),
    ),
    "warm-up + multistep": (
        ["schedule=multistep", "schedule.warmup=2", "schedule.milestones=[5,8]"], 10, 3,
        lambda o: lr_scheduler.SequentialLR(o, [
            lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=2),
            lr_scheduler.MultiStepLR(o, milestones=[3, 6])], milestones=[2]),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_schedules_equal_torchs_own_at_every_step(case):
    overrides, epochs, steps_per_epoch, reference = CASES[case]
    cfg = compose_config(*overrides, "optim.lr=0.1")
    ours_opt, ref_opt = _fresh(), _fresh()
    ours = build_scheduler(cfg.schedule, ours_opt, epochs, steps_per_epoch)
    n = epochs * (steps_per_epoch if cfg.schedule.interval == "step" else 1)
    assert _lrs(ours, ours_opt, n) == pytest.approx(_lrs(reference(ref_opt), ref_opt, n))


def test_goyal_warm_up_keeps_absolute_milestones():
    cfg = compose_config(
        "schedule=multistep",
        "schedule.warmup=5",
        "schedule.milestones=[30,60,80]",
        "schedule.warmup_start_factor=0.1",
        "optim.lr=0.1",
    )
    optimizer = _fresh()
    lrs = _lrs(build_scheduler(cfg.schedule, optimizer, 90, 1), optimizer, 90)
    assert lrs[0] == pytest.approx(0.01) and lrs[5] == pytest.approx(0.1)
    assert lrs[29] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.01)
    assert lrs[60] == pytest.approx(0.001) and lrs[80] == pytest.approx(0.0001)


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_a_milestone_at_the_warm_ups_end_divides_the_rate_there(interval):
    """Milestones [1, 2] with a 1-unit warm-up: the one at 1 was dropped (said to fall within
    the warm-up), and the rest of the run trained 10 times too fast."""
    from resnet_train.engine.plan import plan_steps

    cfg = compose_config("schedule=multistep", "schedule.milestones=[1,2]", "schedule.gamma=0.1",
                         "schedule.warmup=1", f"schedule.interval={interval}", "optim.lr=0.1",
                         "trainer.epochs=3")  # fmt: skip
    optimizer = _fresh()
    lrs = _lrs(build_scheduler(cfg.schedule, optimizer, 3, 1), optimizer, 3)
    assert lrs == pytest.approx([0.01, 0.01, 0.001])
    assert not any("warm-up" in note for note in plan_steps(cfg, 32).notes)
    early = compose_config("schedule=multistep", "schedule.milestones=[1,3]", "schedule.warmup=2",
                           "trainer.epochs=4")  # fmt: skip
    assert any("schedule.milestones [1] fall within the warm-up" in note
               for note in plan_steps(early, 32).notes)  # fmt: skip


def test_schedule_keys_the_schedule_does_not_read_are_said():
    """schedule=step with schedule.min_lr=0.05 trained down to 0.001, without a word."""
    from resnet_train.engine.plan import unused_keys

    assert unused_keys(compose_config("schedule=step", "schedule.min_lr=0.05")) == [
        "schedule.min_lr=0.05 does nothing with schedule=step (only schedule=cosine or "
        "cosine_restarts reads it)"
    ]
    assert unused_keys(
        compose_config("schedule=cosine", "schedule.pct_start=0.5", "schedule.step_size=5")
    ) == [  # fmt: skip
        "schedule.step_size=5 does nothing with schedule=cosine (only schedule=step reads it)",
        "schedule.pct_start=0.5 does nothing with schedule=cosine (only schedule=onecycle reads "
        "it)",
    ]
    for name in ("constant", "step", "multistep", "cosine", "cosine_restarts", "onecycle"):
        assert unused_keys(compose_config(f"schedule={name}")) == []


@pytest.mark.parametrize(("steps", "first", "peak"), [(3, 0.1, 0.1), (4, 0.004, 0.0812),
                                                      (40, 0.004, 0.1)])  # fmt: skip
def test_the_onecycle_line_gives_the_rates_its_steps_train_at(steps, first, peak):
    """A 3-step run starts at the peak and a 4-step one never reaches it: the line said
    0.004 -> 0.1 -> 4e-07 for both."""
    from resnet_train.optim import onecycle_rates

    cfg = compose_config("schedule=onecycle", "optim.lr=0.1").schedule
    rates = onecycle_rates(cfg, 0.1, 1, steps)
    optimizer = _fresh(0.1)
    lrs = _lrs(build_scheduler(cfg, optimizer, 1, steps), optimizer, steps)
    assert rates == (lrs[0], max(lrs), lrs[-1])
    assert rates[:2] == pytest.approx((first, peak), rel=1e-3)
    # stepped per epoch: the run's epochs are its steps (it counted batches, and failed)
    per_epoch = compose_config("schedule=onecycle", "schedule.interval=epoch").schedule
    optimizer = _fresh(0.1)
    lrs = _lrs(build_scheduler(per_epoch, optimizer, steps, 7), optimizer, steps)
    assert onecycle_rates(per_epoch, 0.1, steps, 7) == (lrs[0], max(lrs), lrs[-1])


def test_the_gradient_norm_is_logged_before_a_value_clip_and_one_clip_at_a_time(tmp_path):
    """train/grad_norm with trainer.clip_grad_value was the norm after clipping (1.015 of 3.23);
    both clips at once applied both, silently."""
    from resnet_train.config import validate
    from resnet_train.errors import ConfigError

    common = [*SMOKE, "data.train_size=64", "trainer.log_every_steps=1", "data.loader=torch"]
    fit(compose_config(*common), tmp_path / "plain")
    fit(compose_config(*common, "trainer.clip_grad_value=0.001"), tmp_path / "clipped")
    plain, clipped = (scalars(tmp_path / r)["train/grad_norm"] for r in ("plain", "clipped"))
    assert clipped[0][1] == pytest.approx(plain[0][1], rel=1e-5)  # the first step: the same
    with pytest.raises(
        ConfigError,
        match=r"trainer.clip_grad_value=0.001 is invalid: clip by "
        r"the norm \(trainer.clip_grad_norm=5.0\) or by the value, not both",
    ):
        validate(compose_config(*common, "trainer.clip_grad_value=0.001",
                                "trainer.clip_grad_norm=5"))  # fmt: skip


def test_the_progress_lines_show_the_rate_of_the_step_they_follow(tmp_path, caplog):
    """A warm-up's first line said step 2's rate (0.0325 where step 1 trained at 0.01), and the
    last line of a one-cycle run a rate no step used."""
    import logging

    cfg = compose_config(*SMOKE, "data.train_size=160", "schedule.interval=step",
                         "schedule.warmup=4", "trainer.log_every_steps=1")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="resnet_train"):
        fit(cfg, tmp_path)
    shown = [float(r.message.split("  lr ")[1].split()[0]) for r in caplog.records
             if "  batch " in r.message and "  lr " in r.message]  # fmt: skip
    logged = [value for _, value in scalars(tmp_path)["lr"]]
    assert len(shown) == len(logged) > 4
    assert shown == pytest.approx(logged, rel=1e-3)


def test_training_logs_the_per_step_onecycle_rate_torch_would_give(tmp_path):
    cfg = compose_config(*SMOKE, "data.train_size=160", "trainer.epochs=2", "schedule=onecycle",
                         "optim.lr=0.2")  # fmt: skip
    fit(cfg, tmp_path)
    logged = [value for _, value in scalars(tmp_path)["lr"]]
    steps = len(logged)
    assert steps == 2 * math.ceil(144 / 32)  # 144 training images after the 10% split
    optimizer = _fresh(0.2)
    reference = lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=steps)
    assert logged == pytest.approx(_lrs(reference, optimizer, steps), rel=1e-6)


@pytest.mark.parametrize("steps", [2, 3, 4, 5, 8, 40])
def test_onecycle_peaks_and_anneals_even_when_its_rise_is_one_step(steps):
    # pct_start 0.25 of 4 steps: torch's OneCycleLR alone divides by zero here; of 2 or 3
    # steps it skips the peak (it began at 0.32 and 0.39 of 0.4, then fell to the floor).
    cfg = compose_config("schedule=onecycle", "schedule.pct_start=0.25", "optim.lr=0.4")
    optimizer = _fresh(0.4)
    lrs = _lrs(build_scheduler(cfg.schedule, optimizer, 1, steps), optimizer, steps)
    assert len(lrs) == steps and all(math.isfinite(lr) for lr in lrs)
    peak = lrs.index(max(lrs))
    assert max(lrs) <= 0.4 + 1e-9 and peak <= math.ceil(0.25 * steps)
    assert lrs[peak:] == sorted(lrs[peak:], reverse=True) and lrs[-1] < 0.4 / 25
    if steps <= 3:  # the rise is under one step: the first step is the peak
        assert lrs[0] == pytest.approx(0.4, rel=1e-3)


def test_onecycle_over_a_single_schedule_step_is_refused_in_one_line(tmp_path):
    """One epoch with schedule.interval=epoch: one rate for the whole run, which one-cycle can
    only put at its floor (it trained at 4e-7)."""
    result = run_cli(*SMOKE, "schedule=onecycle", "schedule.interval=epoch", cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "outputs").exists()
    assert result.stderr.strip() == (
        "resnet-train: error: schedule.interval=epoch is invalid with schedule=onecycle here: "
        "the rate rises and falls over at least 2 epochs, and this run has 1 "
        "(trainer.epochs=1); use schedule.interval=step or more epochs"
    )
    # already in steps, one step per epoch: no advice to set what is set
    result = run_cli(*SMOKE, "schedule=onecycle", "schedule.interval=step", "trainer.epochs=1",
                     "data.batch_size=4096", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and not (tmp_path / "outputs").exists()
    assert result.stderr.strip().startswith(
        "resnet-train: error: schedule.interval=step is invalid with schedule=onecycle here: "
        "the rate rises and falls over at least 2 optimizer steps, and this run has 1 "
        "(trainer.epochs=1 x 1 steps per epoch); use more epochs, a larger training set or a "
        "smaller batch"
    ), result.stderr


RECIPES = [
    "cifar10_resnet_paper",
    "cifar10_resnet18",
    "cifar10_resnet18_cosine",
    "cifar10_resnet56",
    "imagenet_resnet50",
    "imagenet_resnet50_modern",
    "cifar10_cpu",
    "cifar10_resnet18_fast",
    "smoke",
]


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_validates_and_names_its_source(name):
    from resnet_train.config import validate
    from tests.conftest import REPO

    validate(compose_config(f"experiment={name}", "trainer.device=cpu"))
    text = (REPO / "configs" / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"resnet-train experiment={name}" in text  # how to run it


def test_paper_recipe_divides_the_lr_at_32k_and_48k_iterations_and_ends_near_64k():
    cfg = compose_config("experiment=cifar10_resnet_paper", "model=resnet110")
    assert cfg.model.name == "resnet110" and cfg.optim.decay_norm_and_bias
    steps_per_epoch = math.ceil(45_000 / cfg.data.batch_size)  # 352
    total = cfg.trainer.epochs * steps_per_epoch
    assert 64_000 <= total < 64_000 + steps_per_epoch
    optimizer = _fresh(cfg.optim.lr)
    lrs = _lrs(build_scheduler(cfg.schedule, optimizer, cfg.trainer.epochs, steps_per_epoch),
               optimizer, total)  # fmt: skip
    assert lrs[31_999] == pytest.approx(0.1) and lrs[32_000] == pytest.approx(0.01)
    assert lrs[47_999] == pytest.approx(0.01) and lrs[48_000] == pytest.approx(0.001)


def test_imagenet_recipes_scale_the_lr_with_the_global_batch():
    v1 = compose_config("experiment=imagenet_resnet50")
    assert effective_lr(v1.optim, 256) == pytest.approx(0.1)
    assert effective_lr(v1.optim, 8 * 32) == pytest.approx(0.1)
    modern = compose_config("experiment=imagenet_resnet50_modern")
    assert effective_lr(modern.optim, 1024) == pytest.approx(0.5)  # torchvision's 0.5 at 1024
    optimizer = _fresh(0.5)
    lrs = _lrs(build_scheduler(modern.schedule, optimizer, 600, 1), optimizer, 600)
    assert lrs[0] == pytest.approx(0.005) and lrs[5] == pytest.approx(0.5)
    assert lrs[-1] < 1e-4
    assert modern.trainer.label_smoothing == 0.1 and modern.trainer.ema.decay == 0.99997


# (schedule overrides, epochs first, epochs on resume); 58 training images (of 8x8: the rates
# are the point) in batches of 32: 2 steps an epoch.
LONGER = {
    "cosine": (["schedule=cosine"], 2, 5),
    "cosine per step": (["schedule=cosine", "schedule.interval=step"], 2, 4),
    "onecycle": (["schedule=onecycle"], 1, 2),
    "step with warm-up": (["schedule=step", "schedule.step_size=2", "schedule.warmup=1"], 2, 5),
    "step": (["schedule=step", "schedule.step_size=2"], 2, 5),
    "multistep": (["schedule=multistep", "schedule.milestones=[1,3]"], 2, 4),
    "cosine restarts": (["schedule=cosine_restarts", "schedule.restart_period=2"], 2, 4),
    "constant": (["schedule=constant"], 1, 2),
}


@pytest.mark.parametrize("case", LONGER)
def test_a_run_lengthened_on_resume_follows_the_schedule_of_its_new_length(case, tmp_path):
    """trainer.epochs raised on resume: from the resume point on, every step's rate is the one a
    run configured with the new length from the start uses (cosine used to sit at 0.0 and rise
    again; one-cycle crashed: "Tried to step 5 times")."""
    overrides, first, longer = LONGER[case]
    common = [*SMOKE, "data.train_size=64", "data.test_size=16", "data.image_size=8",
              "trainer.log_every_steps=1", *overrides]  # fmt: skip
    fit(compose_config(*common, f"trainer.epochs={first}"), tmp_path / "run")
    fit(compose_config(*common, f"trainer.epochs={longer}", "resume=auto"), tmp_path / "run")
    fit(compose_config(*common, f"trainer.epochs={longer}"), tmp_path / "reference")
    resumed = dict(scalars(tmp_path / "run")["lr"])
    reference = dict(scalars(tmp_path / "reference")["lr"])
    assert sorted(resumed) == sorted(reference) == list(range(1, 2 * longer + 1))
    after = range(2 * first + 1, 2 * longer + 1)
    assert [resumed[s] for s in after] == [reference[s] for s in after]


def _momenta(optimizer, scheduler, n: int) -> list[float]:
    values = []
    for _ in range(n):
        group = optimizer.param_groups[0]
        values.append(group["betas"][0] if "betas" in group else group["momentum"])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [(["optim.momentum=0.0"], 0.0), (["optim=adamw", "optim.betas=[0.5,0.999]"], 0.5)],
)
def test_onecycle_keeps_the_configured_momentum(overrides, expected):
    cfg = compose_config("schedule=onecycle", *overrides)
    optimizer = build_optimizer(cfg.optim, create_model("resnet20"), cfg.optim.lr)
    scheduler = build_scheduler(cfg.schedule, optimizer, 2, 10)
    assert set(_momenta(optimizer, scheduler, 20)) == {expected}


def test_onecycle_cycles_the_momentum_below_the_configured_value_when_asked():
    cfg = compose_config("schedule=onecycle", "schedule.cycle_momentum=true", "optim.momentum=0.9")
    optimizer = build_optimizer(cfg.optim, create_model("resnet20"), cfg.optim.lr)
    scheduler = build_scheduler(cfg.schedule, optimizer, 2, 10)
    lrs_and_momenta = []
    for _ in range(20):
        group = optimizer.param_groups[0]
        lrs_and_momenta.append((group["lr"], group["momentum"]))
        optimizer.step()
        scheduler.step()
    momenta = [m for _, m in lrs_and_momenta]
    assert momenta[0] == pytest.approx(0.9) and min(momenta) == pytest.approx(0.8)
    peak = max(range(20), key=lambda i: lrs_and_momenta[i][0])
    assert momenta[peak] == pytest.approx(0.8)  # lowest where the rate is highest


def test_the_onecycle_momentum_in_use_is_logged(tmp_path):
    result = run_cli(*SMOKE, "data.train_size=64", "schedule=onecycle", "hydra.run.dir=run",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "momentum stays 0.9 (schedule.cycle_momentum=false)" in result.stdout


def test_batch_larger_than_the_training_set_is_capped_and_the_rate_scaled_for_it(tmp_path):
    # 64 images, 58 after the validation split: a step sees 58, whatever the batch says.
    for extra in (["data.batch_size=1000"], ["data.batch_size=16", "trainer.accumulate_steps=50"]):
        cfg = compose_config(*SMOKE, "data.train_size=64", "optim.lr_scaling=linear", *extra)
        from resnet_train.engine.plan import plan_steps

        plan = plan_steps(cfg, 58)
        assert (plan.global_batch, plan.steps_per_epoch) == (58, 1)
        assert plan.lr == pytest.approx(0.1 * 58 / 256)
        assert "each optimizer step sees 58" in plan.notes[0]


def test_a_run_shortened_below_where_it_stopped_mid_epoch_is_refused(tmp_path, monkeypatch):
    from resnet_train.engine import faults
    from resnet_train.engine.preemption import Preempted

    common = [*SMOKE, "data.train_size=64", "schedule=onecycle"]
    faults.reset()
    monkeypatch.setenv(faults.ENV, "step:5:USR1")  # inside epoch 3 of 3
    with pytest.raises(Preempted):
        fit(compose_config(*common, "trainer.epochs=3"), tmp_path)
    monkeypatch.delenv(faults.ENV)
    # its weights are past epoch 2's end (tested, they were reported as epoch 2's): refused
    from resnet_train.errors import CheckpointError

    with pytest.raises(CheckpointError, match="trainer.epochs=2 ends before .* epoch 3"):
        fit(compose_config(*common, "trainer.epochs=2", "resume=auto"), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


OPTIMIZERS = sorted(p.stem for p in (REPO / "configs" / "optim").glob("*.yaml"))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_a_run_and_its_resume(name, tmp_path):
    """Each optim= config through the whole trainer (fused on the CPU, with the finite guard's
    flag): the loss falls, and a resumed run continues with the optimizer's state."""
    tiny = [*SMOKE, f"optim={name}", "data.train_size=128", "data.test_size=32",
            "data.batch_size=32", "trainer.log_every_steps=2"]  # fmt: skip
    if name == "adamw":
        tiny.append("optim.lr=0.003")
    metrics = fit(compose_config(*tiny, "trainer.epochs=3"), tmp_path / "run")
    losses = [record["train_loss"] for record in metrics["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["optimizer"]["state"]
    assert state and all(s for s in state.values())  # momentum or Adam's moments were kept
    if name == "adamw":
        assert {float(s["step"]) for s in state.values()} == {12.0}  # 3 epochs of 4 steps
    last = tmp_path / "run" / "last.pt"
    resumed = fit(compose_config(*tiny, "trainer.epochs=4", f"resume={last}"), tmp_path / "resumed")
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]


MIXED = [*SMOKE, "data.train_size=96", "data.test_size=32", "data.batch_size=32", "seed=0"]


@pytest.fixture(scope="module")
def initial_fc(tmp_path_factory) -> torch.Tensor:
    """The classifier's weights a run of MIXED starts from (a run with lr 0 leaves them)."""
    run = tmp_path_factory.mktemp("lr0")
    fit(compose_config(*MIXED, "optim=sgd", "optim.lr=0"), run)
    return torch.load(run / "last.pt", weights_only=False)["model"]["fc.weight"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_in_each_mixed_precision(name, precision, initial_fc, tmp_path):
    """optim x precision: bf16 goes through the finite guard's flag and the fused step, fp16
    through the gradient scaler's; each must step the weights and keep fp32 master weights."""
    metrics = fit(compose_config(*MIXED, f"optim={name}", f"trainer.precision={precision}"),
                  tmp_path)  # fmt: skip
    assert math.isfinite(metrics["history"][0]["train_loss"])
    trained = torch.load(tmp_path / "last.pt", weights_only=False)["model"]["fc.weight"]
    assert trained.dtype == torch.float32
    assert not torch.equal(trained, initial_fc)  # steps were applied


def test_optimizer_and_schedule_keys_that_are_never_read_are_said():
    from resnet_train.engine.plan import unused_keys

    assert unused_keys(compose_config("optim=adamw", "optim.nesterov=true")) == [
        "optim.nesterov and optim.momentum do nothing with optim=adamw (its momentum is "
        "optim.betas)"
    ]
    assert unused_keys(compose_config("schedule=constant", "schedule.milestones=[1,2]")) == [
        "schedule.milestones does nothing with schedule=constant (only schedule=multistep reads it)"
    ]
    assert unused_keys(compose_config("trainer.distill.alpha=0.5")) == [
        "trainer.distill.alpha does nothing without a teacher (trainer.distill.teacher=PATH)"
    ]
    assert unused_keys(
        compose_config("trainer.distill.alpha=0.5", "trainer.distill.temperature=2")
    )[0].startswith("trainer.distill.temperature and trainer.distill.alpha do ")
    assert unused_keys(compose_config("optim=adamw")) == []
    assert unused_keys(compose_config("schedule=multistep", "schedule.milestones=[1,2]")) == []
    assert unused_keys(compose_config("optim=sgd", "optim.nesterov=true")) == []
