"""models.study and what it relies on: recipe terms one at a time, HLFD's released wiring, the
teacher-output cache, semi-supervised task losses, ensemble choice on validation, the record."""

import json

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

pytest.importorskip("monai", reason="models/ needs the models extra: pip install -e .[models]")

import kdkernels.reference as ref  # noqa: E402
from models.datasets import Split  # noqa: E402
from models.engine import Runtime, augment, labelled_only, to_input, to_target, train  # noqa: E402
from models.recipes import RECIPES  # noqa: E402
from models.study import choose_members, paired_stats  # noqa: E402
from models.teacher_cache import TeacherCache  # noqa: E402

CPU = Runtime(torch.device("cpu"))


def _images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _kd_inputs(name, size=64, batch=2):
    """A recipe's student kd inputs (as leaves), teacher output, modules and targets on random frames."""
    recipe = RECIPES[name]()
    torch.manual_seed(0)
    k = 8 if recipe.task == "classification" else 1
    teacher, student = recipe.teacher(k).eval(), recipe.student(k)
    modules = recipe.kd_modules(teacher, student)
    x = to_input(_images(batch if name != "ltg" else 4, size), CPU.device)
    with torch.no_grad():
        t_out = teacher(x)
    leaves = [t.detach().requires_grad_() for t in recipe.kd_inputs(student(x))]
    y = torch.arange(len(x)) % k if recipe.task == "classification" else torch.zeros(len(x), 1, size, size)
    return leaves, t_out, modules, y


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_term_alone_and_their_sum(name):
    leaves, t_out, modules, y = _kd_inputs(name)
    recipe = RECIPES[name]()
    full = recipe.kd_terms(leaves, t_out, modules, y, "torch")
    assert set(recipe.terms) <= set(full)
    for term in recipe.terms:
        alone = RECIPES[name](terms=(term,)).kd_terms(leaves, t_out, modules, y, "torch")
        assert set(alone) - {"fusion"} == {term}
        torch.testing.assert_close(alone[term], full[term], rtol=0, atol=0)
        assert alone[term].item() > 0
    torch.testing.assert_close(recipe.kd_loss(leaves, t_out, modules, y, "torch"), sum(full.values()))
    with pytest.raises(ValueError, match="not distillation terms"):
        RECIPES[name](terms=("nope",))


def test_hlfd_is_wired_as_the_released_code():
    """Against SPEC section 4 written out with the reference ops: e1..e5 at strides 2..32, d5..d2
    at 16..2, the recursive targets concatenated at the student's resolution, the halves."""
    (e1, e2, e3, e4, d5, d4, d3, d2), t, modules, _ = _kd_inputs("hlfd", size=64)
    assert [f.shape[-1] for f in (e1, e2, e3, e4)] == [32, 16, 8, 4]
    assert [f.shape[-1] for f in t.encoder] == [32, 16, 8, 4, 2]
    assert [f.shape[-1] for f in (d5, d4, d3, d2)] == [4, 8, 16, 32]

    def at(s, target):
        return ref.attention_transfer_loss(s, target, p=4.0, resize="bilinear", reduction="batchmean")

    def up(f, like):
        return F.interpolate(f, size=like.shape[-2:], mode="bilinear", align_corners=False)

    feature = 0.5 * at(e1, torch.cat([up(f, e1) for f in t.encoder[1:4]], 1)) + 0.5 * sum(
        at(s, t.encoder[4]) for s in (e2, e3, e4))
    recursive = torch.cat([t.decoder[0], F.avg_pool2d(t.decoder[1], 2), F.avg_pool2d(t.decoder[2], 4)], 1)
    pixel = 0.5 * ref.pixel_kl_loss(modules["to_teacher"](d5), recursive, temperature=4.0) + 0.5 * sum(
        ref.pixel_kl_loss(a(d), F.adaptive_avg_pool2d(t.logits, d.shape[-2:]), temperature=4.0)
        for a, d in zip(modules["to_logit"], (d4, d3, d2)))
    terms = RECIPES["hlfd"]().kd_terms([e1, e2, e3, e4, d5, d4, d3, d2], t, modules, None, "torch")
    torch.testing.assert_close(terms["feature"], 0.9 * feature)
    torch.testing.assert_close(terms["pixel"], 0.1 * pixel)


@pytest.mark.parametrize("name", ["kdas", "hlfd", "ltg"])
def test_teacher_cache_equals_the_teacher_forward(name, tmp_path):
    recipe = RECIPES[name]()
    torch.manual_seed(0)
    teacher = recipe.teacher(8).eval()
    images = _images(5, 32 if name == "ltg" else 64)
    task = recipe.task
    labels = torch.zeros(5, dtype=torch.long) if task == "classification" else torch.zeros(5, 64, 64)
    TeacherCache.build(teacher, Split(images, labels), CPU, batch_size=2).save(tmp_path / "c.pt")
    cache = TeacherCache.load(tmp_path / "c.pt")
    for seed in range(3):
        idx = torch.randperm(5, generator=torch.Generator().manual_seed(seed))[:3]
        x, _, flips = augment(to_input(images[idx], CPU.device), to_target(labels[idx], task, CPU.device),
                              task, seed)
        with torch.no_grad():
            live = pytree.tree_leaves(teacher(x))
        looked_up = pytree.tree_leaves(cache.lookup(idx, flips, CPU.device))
        assert len(live) == len(looked_up)
        for a, b in zip(live, looked_up):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def _tiny_ltg(labelled, steps_seed=3):
    recipe = RECIPES["ltg"]()
    torch.manual_seed(1)
    net = recipe.student(8)
    split = Split(_images(16, 32), torch.arange(16) % 8)
    times = train(net, recipe, split, CPU, epochs=1, batch_size=4, seed=steps_seed, desc="t", lr=1e-3,
                  loss_fn=recipe.task_loss, labelled=labelled)
    return net, times


def test_semi_supervised_task_loss_sees_only_labelled_samples():
    everything, _ = _tiny_ltg(None)
    all_labelled, _ = _tiny_ltg(torch.ones(16, dtype=torch.bool))
    for a, b in zip(everything.state_dict().values(), all_labelled.state_dict().values()):
        assert torch.equal(a, b)
    _, none = _tiny_ltg(torch.zeros(16, dtype=torch.bool))
    assert none.steps == 0  # a plain student without labels never steps
    half = torch.arange(16) % 2 == 0
    out, y = labelled_only((torch.randn(16, 8), torch.randn(16, 74)), torch.arange(16), half)
    assert out[0].shape == (8, 8) and out[1].shape == (8, 74) and torch.equal(y, torch.arange(0, 16, 2))


def test_ensemble_members_chosen_greedily_on_validation():
    subsets = {"0": 0.90, "1": 0.70, "2": 0.95, "0,1": 0.85, "0,2": 0.96, "1,2": 0.9, "0,1,2": 0.955}
    members, tried = choose_members(subsets)
    assert members == (0, 2)
    assert [t["members"] for t in tried] == [[2], [0, 2], [0, 1, 2]]
    assert choose_members({"0": 0.9, "1": 0.8, "0,1": 0.85})[0] == (0,)


def test_paired_statistics():
    stats = paired_stats([{"seed": s, "plain": 0.5, "kd": 0.5 + d} for s, d in
                          enumerate([0.1, 0.2, 0.12, 0.15, 0.08])])
    assert stats["positive"] == 5 and stats["gain"] and abs(stats["mean"] - 0.13) < 1e-12
    assert abs(stats["se"] - stats["sd"] / 5 ** 0.5) < 1e-15
    assert not paired_stats([{"seed": s, "plain": 0.5, "kd": 0.5 + d} for s, d in
                             enumerate([0.1, -0.1, 0.05, -0.05, 0.01])])["gain"]
    # Four of five positive but the mean within 2 SE: no gain.
    assert not paired_stats([{"seed": s, "plain": 0.5, "kd": 0.5 + d} for s, d in
                             enumerate([0.01, 0.01, 0.01, 0.01, -0.2])])["gain"]


@pytest.mark.slow
def test_study_record_and_resume(tmp_path):
    from models.study import main as study

    args = ["--recipe", "ltg", "--quick", "--seeds", "2", "--ablations", "--regimes", "semi",
            "--out", str(tmp_path)]
    assert study(args) == 0
    record = json.loads((tmp_path / "ltg.json").read_text())
    assert record["recipe"] == "ltg" and record["metric"] == "accuracy"
    assert [p["seed"] for p in record["pairs"]] == [1, 2]
    assert all(set(p) == {"seed", "plain", "kd"} for p in record["pairs"])
    assert set(record["ablations"]) == {"response", "feature", "relation"}
    assert set(record["regimes"]) == {"semi"}
    nets = record["networks"]
    for seed in (1, 2):
        assert record["pairs"][seed - 1]["plain"] == nets[f"plain-main-s{seed}"]["test"]["accuracy"]
        assert record["pairs"][seed - 1]["kd"] == nets[f"kd-main-s{seed}"]["test"]["accuracy"]
        assert nets[f"kd[response]-main-s{seed}"]["test"] is not None
    # The ensemble was chosen on validation from the members the teacher job measured, and so was
    # the reported setting among the equal-steps ones.
    assert record["ensemble_tried"] and record["members"] == sorted(record["members"])
    assert {t["setting"] for t in record["tried"]} == {"faithful", "response only", "feature only",
                                                       "relation only"}
    best = max(record["tried"], key=lambda t: t["validation_mean"])
    assert record["chosen_on_validation"]["setting"] == best["setting"]
    assert record["teacher"] == nets["prepare"]["test"]["accuracy"]
    assert record["teacher_outputs_cached"]
    assert (tmp_path / "ltg.png").stat().st_size > 0
    # --resume reuses every finished network: the same record, nothing retrained.
    (tmp_path / "ltg.json").unlink()
    assert study([*args, "--resume"]) == 0
    again = json.loads((tmp_path / "ltg.json").read_text())
    assert again["pairs"] == record["pairs"] and again["networks"] == record["networks"]


def test_recipes_with_one_teacher_network_share_its_checkpoints(tmp_path):
    from models.train import UsageError, load_teacher, save

    hlfd, cpkd, kdas = RECIPES["hlfd"](), RECIPES["cpkd"](), RECIPES["kdas"]()
    torch.manual_seed(0)
    teacher = hlfd.teacher(1)
    save(teacher, tmp_path / "teacher.pt", hlfd, hlfd.default, ("polyp",))
    torch.manual_seed(1)
    loaded = cpkd.teacher(1)
    load_teacher(str(tmp_path / "teacher.pt"), cpkd, loaded)
    for a, b in zip(teacher.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UsageError, match=r"a hlfd checkpoint \(expected a Polyp-PVT"):
        load_teacher(str(tmp_path / "teacher.pt"), kdas, kdas.teacher(1))
