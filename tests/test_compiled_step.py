"""The distillation losses inside a torch.compile'd training step of the reference models.

For each recipe of models/recipes, at tiny sizes (64 px, B = 2; LTG 32 px, B = 4), with the fused
`cpu` backend and the eager `torch` one:
- the distillation loss compiles with fullgraph=True into one graph, which holds the kdkernels
  custom ops themselves (cpu) and none of them (torch);
- the student's step (forward, task loss, distillation loss) compiled gives the loss and the
  gradients of the eager step on the same backend and of the eager reference step (torch).
The teacher runs eagerly under no_grad, as it does in models/engine.py: it is a frozen target.
The compiler backend is "aot_eager" (Dynamo + AOTAutograd, which traces the custom ops' fake
kernels and registered backwards): Inductor needs minutes per network on 2 CPU cores and adds
nothing to what is checked here (tests/test_<op>.py compile every op with Inductor).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

pytest.importorskip("monai", reason="models/ needs the models extra: pip install -e .[models]")

import kdkernels as kdk  # noqa: E402
from models.engine import to_input, to_target  # noqa: E402
from models.recipes import RECIPES  # noqa: E402
from models.synthetic import KVASIR_CLASSES, class_set, polyp_set  # noqa: E402
from helpers import assert_close_rel  # noqa: E402

BACKENDS = [b for b in ("cpu", "torch") if kdk.backends()[b]["available"]]
# MONAI's DiceFocalLoss (the HLFD/CPKD task loss) breaks the graph on data-dependent reduction
# axes; the distillation part of those steps is still checked whole by the fullgraph test.
FULLGRAPH_STEP = {"kdas": True, "ltg": True, "hlfd": False, "cpkd": False}
# AOTAutograd decomposes bilinear F.interpolate into index arithmetic, whose backward sums in
# another order: through the UNets' four upsamplings and BatchNorms the compiled step's weight
# gradients differ from eager by up to 1.4e-4 of the largest one (CPKD; the same with the torch
# backend as with cpu, and 0 on the adapters). The distillation part alone is checked at 1e-5.
STEP_RTOL = {"kdas": 1e-5, "ltg": 1e-5, "hlfd": 5e-4, "cpkd": 5e-4}


class RecordingBackend:
    """aot_eager that keeps the Dynamo graphs it is given."""

    def __init__(self):
        self.graphs = []
        self.aot_eager = lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.aot_eager(gm, example_inputs)

    def kdkernels_ops(self) -> set[str]:
        return {str(node.target) for gm in self.graphs for node in gm.graph.nodes
                if node.op == "call_function" and "kdkernels" in str(node.target)}

    def missing(self, public_ops) -> list[str]:
        """Public ops none of whose custom ops (kdkernels::<op without _loss>...) is in a graph."""
        ops = self.kdkernels_ops()
        return [op for op in public_ops if not any(op.removesuffix("_loss") in s for s in ops)]


def _setup(name: str):
    recipe = RECIPES[name]()
    torch.manual_seed(0)
    if recipe.task == "segmentation":
        images, labels = polyp_set(2, 64, seed=0)
        classes = 1
    else:
        images, labels = class_set(4, 32, seed=0)
        classes = len(KVASIR_CLASSES)
    teacher, student = recipe.teacher(classes).eval(), recipe.student(classes).train()
    modules = recipe.kd_modules(teacher, student).train()
    x, y = to_input(images, torch.device("cpu")), to_target(labels, recipe.task, torch.device("cpu"))
    with torch.no_grad():
        teacher_out = teacher(x)
    return recipe, student, modules, x, y, teacher_out


def _take_grads(params) -> torch.Tensor:
    """All gradients as one flat tensor (zeros where none); clears them."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params])
    for p in params:
        p.grad = None
    return flat


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every case compiles the same functions anew
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_distillation_loss_compiles_fullgraph(name, backend):
    recipe, student, modules, x, y, teacher_out = _setup(name)
    with torch.no_grad():
        kd_in = recipe.kd_inputs(student(x))

    def kd_loss(leaves):
        return recipe.kd_loss(leaves, teacher_out, modules, y, backend)

    recorder = RecordingBackend()
    compiled = torch.compile(kd_loss, backend=recorder, fullgraph=True)
    results = []
    for fn in (compiled, kd_loss):
        leaves = [t.detach().requires_grad_() for t in kd_in]
        loss = fn(leaves)
        results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    assert len(recorder.graphs) == 1
    if backend == "cpu":
        # Each op reaches its kernel inside the graph (KDAS's structure_loss is its task loss).
        assert not recorder.missing([op for op in recipe.ops if op != "structure_loss"])
    else:
        assert not recorder.kdkernels_ops()
    (loss, grads), (ref, ref_grads) = results
    assert_close_rel(loss, ref, 1e-6, f"{name} kd loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close_rel(g, r, 1e-5, f"{name} kd grad {i}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_compiled_training_step_matches_eager(name, backend):
    recipe, student, modules, x, y, teacher_out = _setup(name)
    params = list(student.parameters()) + list(modules.parameters())

    def step(x, y, teacher_out, backend):
        out = student(x)
        task = recipe.task_loss(out, y, backend)
        kd = recipe.kd_loss(recipe.kd_inputs(out), teacher_out, modules, y, backend)
        return recipe.task_weight * task + kd

    def loss_and_grads(fn, backend):
        loss = fn(x, y, teacher_out, backend)
        loss.backward()
        return loss.detach(), _take_grads(params)

    recorder = RecordingBackend()
    compiled = torch.compile(step, backend=recorder, fullgraph=FULLGRAPH_STEP[name])
    loss, grads = loss_and_grads(compiled, backend)
    assert recorder.graphs
    assert not recorder.missing(recipe.ops if backend == "cpu" else ())
    # Against the eager step on the same backend, and against the eager reference (torch).
    for ref_backend in dict.fromkeys((backend, "torch")):
        ref, ref_grads = loss_and_grads(step, ref_backend)
        what = f"{name}: compiled {backend} step against eager {ref_backend}"
        assert_close_rel(loss, ref, 1e-6, f"{what}, loss")
        # One scale for all parameters: some have gradients near zero, where any rounding
        # difference would be a large relative error of that tensor alone.
        assert ref_grads.abs().max() > 0
        assert_close_rel(grads, ref_grads, STEP_RTOL[name], f"{what}, gradients")
