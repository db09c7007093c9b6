# Copy into tests/ to run (it uses the suite's fixtures); what it printed on the H200 is idc-graph-diag.txt.
"""GPU diagnostic (not part of the suite): how far eager IDC runs part from each other and from the
replayed graph, per outer iteration, to derive the tolerance of test_cuda_graph_replays_the_eager_inner_steps."""
import torch
from conftest import tiny_params
from moedd.data import make_partition
from moedd.distill import build_method
from moedd.experts._idc_graph import StaticInnerSteps
from test_idc import TINY


def run(tiny_prepared, capture, iters=2):
    over = {"experts.idc.cuda_graph": True, "experts.idc.inner_loop": 3, "distill.dcor_weight": 0.5}
    params = tiny_params(**{**TINY, **over})
    part = make_partition(tiny_prepared.train_labels, tiny_prepared.num_classes, 2, 0, tiny_prepared.digest)
    m = build_method("idc", params, tiny_prepared, part, torch.device("cuda"))
    syn = m.init_images().requires_grad_(True)
    m.setup(syn)
    x0 = syn.detach().clone()
    static = StaticInnerSteps(m, syn, capture=capture)
    rows = []
    for it in range(iters):
        r = m._static_step(static, syn, it)
        rows.append({k: float(r[k]) for k in ("loss", "match", "net_acc")} | {"x": syn.detach().clone()})
    return x0, rows


def test_diag(tiny_prepared):
    runs = {"e1": run(tiny_prepared, False), "e2": run(tiny_prepared, False),
            "g1": run(tiny_prepared, True), "g2": run(tiny_prepared, True)}
    x0 = runs["e1"][0]
    for a, b in (("e1", "e2"), ("g1", "g2"), ("e1", "g1"), ("e2", "g2")):
        for it, (ra, rb) in enumerate(zip(runs[a][1], runs[b][1])):
            move = float((ra["x"] - x0).norm())
            dx = float((ra["x"] - rb["x"]).norm())
            print(f"DIAG {a}-{b} it{it}: |dx|/|x|={dx / float(ra['x'].norm()):.3e} |dx|/|move|={dx / max(move, 1e-30):.3e} "
                  + " ".join(f"{k}: {ra[k]:.6g} vs {rb[k]:.6g} rel {abs(ra[k] - rb[k]) / max(1.0, abs(ra[k])):.3e}"
                             for k in ("loss", "match", "net_acc")))
