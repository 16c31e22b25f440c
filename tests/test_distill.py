"""Knowledge distillation: the loss, the teacher's place in the step, its record in checkpoints,
resume, the combinations with the other training options, and the errors."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from resnet_train.engine import faults
from resnet_train.engine.checkpoint import load_checkpoint
from resnet_train.engine.distill import DistillLoss, soft_loss
from resnet_train.engine.preemption import Preempted
from resnet_train.engine.trainer import LabelLoss, fit, train_one_epoch
from resnet_train.models import create_model
from tests.conftest import compose_config, run_cli
from tests.test_recipe import make_training, tiny_net, toy_data
from tests.test_resume import SMALL, assert_same_result

TINY = ["model=resnet20", "data=synthetic", "data.train_size=64", "data.test_size=32",
        "data.batch_size=16", "trainer.epochs=1", "trainer.device=cpu"]  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A resnet-train checkpoint of a ResNet-32 (another architecture than the students')."""
    run = tmp_path_factory.mktemp("teacher")
    fit(compose_config(*TINY, "model=resnet32"), run)
    return run / "last.pt"


def test_the_teacher_is_loaded_frozen_in_eval_mode_with_its_own_architecture(teacher):
    from resnet_train.engine.distill import load_teacher

    loaded = load_teacher(compose_config(*TINY, f"trainer.distill.teacher={teacher}"))
    assert loaded.name == "resnet32" and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    state = load_checkpoint(teacher)["model"]
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())


def test_the_soft_loss_is_t_squared_kl_of_the_softened_outputs():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    t = 4.0
    p = F.softmax(teacher.double() / t, 1)
    q = F.log_softmax(student.double() / t, 1)
    expected = (p * (p.log() - q)).sum(1).mean() * t * t
    assert soft_loss(student, teacher, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert soft_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_alpha_weighs_the_label_loss_against_the_soft_loss(alpha):
    images, labels = toy_data(16)[:]
    student, teacher = tiny_net(0), tiny_net(1).eval()
    label_loss = LabelLoss(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    outputs = student(images)
    got = DistillLoss(label_loss, teacher, 4.0, alpha)(images, outputs, labels)
    hard = label_loss(images, outputs, labels)
    soft = soft_loss(outputs, teacher(images), 4.0)
    assert got.item() == pytest.approx(((1 - alpha) * hard + alpha * soft).item(), rel=1e-6)


def test_the_teacher_sees_the_students_mixed_images_under_its_autocast_and_never_changes():
    """MixUp on, bf16: the teacher's input is the student's own (mixed) batch, its outputs are
    bf16 (the step's autocast), its weights and BatchNorm statistics stay as they were (eval
    mode, no gradients)."""
    from resnet_train.config import AugmentConfig
    from resnet_train.data.transforms import build_batch_mixer

    student = tiny_net(0)
    teacher = create_model("resnet20", num_classes=10).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {"student": [], "teacher": [], "dtype": []}
    student.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].clone()))
    teacher.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0].clone()))
    teacher.register_forward_hook(lambda m, a, out: seen["dtype"].append(out.dtype))
    t = make_training(student, precision="bf16")
    t.mixer = build_batch_mixer(AugmentConfig(mixup_alpha=0.4), 10)
    t.objective = DistillLoss(t.objective, teacher, 4.0, 0.9)
    images = torch.stack([x for x, _ in toy_data(32)])
    train_one_epoch(t, DataLoader(toy_data(32), batch_size=16), "kd")
    assert len(seen["teacher"]) == 2 and seen["dtype"] == [torch.bfloat16] * 2
    for s, te in zip(seen["student"], seen["teacher"], strict=True):
        assert torch.equal(s, te)
    assert not torch.equal(seen["student"][0], images[:16])  # mixed, not the raw batch
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_accumulated_micro_batches_give_the_full_batchs_step():
    """Distillation with trainer.accumulate_steps=2 over batches of 8 takes the step that one
    batch of 16 takes (a student without BatchNorm, so the batches see the same statistics)."""
    weights = []
    for batch, k in ((16, 1), (8, 2)):
        student, teacher = tiny_net(0), tiny_net(1).eval()
        t = make_training(student, accumulate_steps=k)
        t.objective = DistillLoss(t.objective, teacher, 4.0, 0.7)
        train_one_epoch(t, DataLoader(toy_data(16), batch_size=batch), "kd")
        assert t.global_step == 1
        weights.append([p.detach().clone() for p in student.parameters()])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_distilled_run_records_its_teacher_and_keeps_only_its_own_weights(tmp_path, teacher):
    args = [*TINY, f"trainer.distill.teacher={teacher}", "trainer.ema.decay=0.9",
            "trainer.label_smoothing=0.1", "name=kd"]  # fmt: skip
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"distilling from a resnet32 ({teacher}, sha256 {sha256(teacher)[:12]}" in result.stdout
    run = tmp_path / "outputs" / "kd"
    record = {"path": str(teacher), "sha256": sha256(teacher), "model": "resnet32"}
    assert json.loads((run / "metrics.json").read_text())["teacher"] == record
    state = load_checkpoint(run / "last.pt")
    assert state["teacher"] == record
    own = set(create_model("resnet20").state_dict())
    assert set(state["model"]) == own
    assert {k.removeprefix("module.") for k in state["ema"]} - {"n_averaged"} == own


def test_resume_takes_the_moved_teacher_and_refuses_a_changed_teacher_model(tmp_path, teacher):
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(teacher, moved)
    args = [*TINY, "trainer.epochs=2", "name=kd"]
    first = run_cli(*args, "trainer.epochs=1", f"trainer.distill.teacher={teacher}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "outputs" / "kd"
    saved = sha256(run / "last.pt")

    other = tmp_path / "other.pt"
    torch.save(create_model("resnet32").state_dict(), other)
    changed = ["trainer.distill.teacher_model=resnet32", "resume=auto"]
    refused = run_cli(*args, f"trainer.distill.teacher={other}", *changed, cwd=tmp_path)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert (
        "was made with another config: trainer.distill.teacher_model: None -> 'resnet32'"
        in (lines[0])
    )
    assert sha256(run / "last.pt") == saved  # nothing changed

    resumed = run_cli(*args, f"trainer.distill.teacher={moved}", "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def test_resume_with_another_teacher_checkpoint_is_refused_with_both(tmp_path, teacher):
    """Same architecture, other weights: the sha256 tells them apart."""
    other_run = tmp_path / "other-teacher"
    fit(compose_config(*TINY, "model=resnet32", "seed=5"), other_run)
    other = other_run / "last.pt"
    args = [*TINY, "trainer.epochs=2", "name=kd"]
    assert run_cli(*args, "trainer.epochs=1", f"trainer.distill.teacher={teacher}",
                   cwd=tmp_path).returncode == 0  # fmt: skip
    run = tmp_path / "outputs" / "kd"
    saved = sha256(run / "last.pt")
    for new, old_name in ((other, f"sha256 {sha256(teacher)[:12]}"), ("null", "")):
        refused = run_cli(*args, f"trainer.distill.teacher={new}", "resume=auto", cwd=tmp_path)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert "was distilled from another teacher: resnet32 " in lines[0] and old_name in lines[0]
        assert lines[0].endswith("resume with the teacher it started with")
    assert sha256(run / "last.pt") == saved


def kd_small(teacher: Path) -> list[str]:
    return [*SMALL, f"trainer.distill.teacher={teacher}", "trainer.label_smoothing=0.1",
            "trainer.ema.decay=0.9"]  # fmt: skip


@pytest.fixture(scope="module")
def kd_reference(tmp_path_factory, teacher) -> Path:
    reference = tmp_path_factory.mktemp("kd-reference")
    fit(compose_config(*kd_small(teacher)), reference)
    return reference


@pytest.mark.parametrize("step", [2, 3])
def test_a_stopped_distillation_resumes_bit_identical(
    step, tmp_path, monkeypatch, teacher, kd_reference
):
    """MixUp, Cutout, label smoothing and EMA with a teacher; stopped mid-epoch (2) and at an
    epoch end (3)."""
    cfg = kd_small(teacher)
    run = tmp_path / "run"
    faults.reset()
    monkeypatch.setenv(faults.ENV, f"step:{step}:USR1")
    with pytest.raises(Preempted):
        fit(compose_config(*cfg), run)
    monkeypatch.delenv(faults.ENV)
    fit(compose_config(*cfg, "resume=auto"), run)
    assert_same_result(run, kd_reference)


def test_a_bare_teacher_file_of_another_architecture_is_named_with_teacher_model(tmp_path):
    bare = tmp_path / "resnet32.pth"
    torch.save(create_model("resnet32").state_dict(), bare)
    result = run_cli(*TINY, f"trainer.distill.teacher={bare}", "name=a", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"resnet-train: error: trainer.distill.teacher={bare}")
    assert lines[0].endswith("(set trainer.distill.teacher_model to its architecture)")
    ok = run_cli(*TINY, f"trainer.distill.teacher={bare}", "trainer.distill.teacher_model=resnet32",
                 "name=b", cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "distilling from a resnet32" in ok.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.distill.teacher={classes100}",
            "is invalid: its classifier has 100 classes, the student's data (synthetic) has 10",
        ),  # fmt: skip
        (
            "trainer.distill.teacher={classes10} model.num_classes=20",
            "is invalid: its classifier has 10 classes, the student has 20 (model.num_classes)",
        ),  # fmt: skip
        ("trainer.distill.teacher={garbage}", "is unreadable (UnpicklingError)"),
        ("trainer.distill.teacher={missing}", "is invalid: no such file"),
        (
            "trainer.distill.teacher_model=resnet56",
            "trainer.distill.teacher_model='resnet56' is "
            "invalid: names the teacher's architecture: set trainer.distill.teacher too",
        ),
        (
            "trainer.distill.teacher_model=resnet7",
            "trainer.distill.teacher_model='resnet7' is invalid: allowed: ",
        ),
        ("trainer.distill.alpha=1.5", "trainer.distill.alpha=1.5 is invalid: must be in [0, 1]"),
        (
            "trainer.distill.temperature=0",
            "trainer.distill.temperature=0.0 is invalid: must be in [0.01, 1000]",
        ),
    ],
)
def test_bad_distillation_settings_fail_in_one_line_before_anything_is_written(
    override, message, tmp_path, monkeypatch, capsys
):
    """The command line's own check (precheck), in-process: exit 2, one line, no run directory."""
    from resnet_train.cli import precheck

    classes100 = tmp_path / "c100.pth"
    torch.save(create_model("resnet20", num_classes=100).state_dict(), classes100)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    classes10 = tmp_path / "c10.pth"
    torch.save(create_model("resnet20", num_classes=10).state_dict(), classes10)
    override = override.format(classes100=classes100, garbage=garbage, classes10=classes10,
                               missing=tmp_path / "missing.pt")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        precheck([*TINY, *override.split(" "), "hydra.run.dir=run"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("resnet-train: error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_teacher_of_other_classes_is_refused_and_one_of_other_normalisation_is_fed_so(
    teacher, tmp_path, monkeypatch, capsys
):
    """A teacher trained on other classes (as many) was taken silently; one trained with another
    mean and std saw the student's images normalised for the student."""
    from resnet_train.cli import precheck
    from resnet_train.engine.distill import load_teacher
    from tests.conftest import make_cifar

    make_cifar(tmp_path, "cifar10", per_file=10)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]  # fmt: skip
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    monkeypatch.chdir(tmp_path)
    fruit = tmp_path / "fruit.pt"  # a teacher of ten named classes, not CIFAR-10's
    state = torch.load(teacher, weights_only=False)
    state["classes"] = ["apple", "banana", "cherry", "date", "elder", "fig", "grape", "kiwi",
                        "lime", "mango"]  # fmt: skip
    torch.save(state, fruit)
    student = ["model=resnet20", "data=cifar10", f"data.root={tmp_path}", "hydra.run.dir=run"]
    with pytest.raises(SystemExit) as stop:
        precheck([*student, f"trainer.distill.teacher={fruit}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == (
        f"resnet-train: error: trainer.distill.teacher={fruit} is invalid: it was trained on "
        "other classes (apple, banana, cherry, date, ... (10)) than the student's data "
        "(airplane, automobile, bird, cat, ... (10)); a teacher teaches its own classes' names, "
        "in its own order\n"
    )
    assert not (tmp_path / "run").exists()
    # class0, class1, ... name no classes (synthetic data, a CIFAR folder without its names)
    assert load_teacher(compose_config(*student, f"trainer.distill.teacher={teacher}"),
                        names).name == "resnet32"  # fmt: skip
    # trained with mean 0.5 and std 0.25 (data=synthetic's), taught with other ones
    own = load_teacher(compose_config(*TINY, f"trainer.distill.teacher={teacher}")).model
    other = ["data.mean=[0.4,0.45,0.5]", "data.std=[0.2,0.3,0.25]"]
    renormalised = load_teacher(
        compose_config(*TINY, *other, f"trainer.distill.teacher={teacher}")
    ).model
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    as_trained = (pixels - 0.5) / 0.25
    as_given = (pixels - torch.tensor([0.4, 0.45, 0.5]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.3, 0.25]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(renormalised(as_given), own(as_trained), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(own(as_given), own(as_trained), atol=1e-3)


def test_a_teacher_keeps_its_own_stem_and_an_unknown_architecture_is_one_line(tmp_path):
    """A bare .pth of an ImageNet-stem teacher for a 32-px student: its 7x7 conv says which."""
    from resnet_train.engine.distill import load_teacher
    from resnet_train.errors import CheckpointError

    bare = tmp_path / "r18.pth"
    torch.save(create_model("resnet18", num_classes=10, stem="imagenet").state_dict(), bare)
    cfg = compose_config(*TINY, f"trainer.distill.teacher={bare}",
                         "trainer.distill.teacher_model=resnet18")  # fmt: skip
    teacher = load_teacher(cfg)
    assert teacher.model.conv1.kernel_size == (7, 7)
    alien = tmp_path / "alien.pt"
    state = load_checkpoint_like(bare, {"model": {"name": "resnet20x"}})
    torch.save(state, alien)
    with pytest.raises(CheckpointError, match=r"holds a 'resnet20x', not a model of this version"):
        load_teacher(compose_config(*TINY, f"trainer.distill.teacher={alien}"))


def load_checkpoint_like(weights: Path, config: dict) -> dict:
    return {"model": torch.load(weights, weights_only=True), "config": config}
