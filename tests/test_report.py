"""The report's cells as metrics of the pipeline run (what the MLflow runs table compares)."""

from __future__ import annotations

from moedd.data.identity import dataset_label
from moedd.report import Cell, run_metrics


def _cell(ipc: int, noe: int, mean: float, net: str = "convnet3", paper: str | None = "c10",
          name: str = "cifar10") -> Cell:
    return Cell("dm", net, 10, ipc, noe, mean, 0.5, 3, "mixup", 300, paper, name)


def test_cells_become_accuracy_and_gain_metrics() -> None:
    cells = [_cell(5, 2, 49.0), _cell(10, 1, 47.5), _cell(5, 2, 30.0, "vgg11"), _cell(5, 2, 20.0, paper=None, name="pets"),
             _cell(5, 2, 25.0, paper="c100", name="my-cifar100 png")]
    m = run_metrics(cells)
    assert m["acc/cifar10/b10/5x2/dm/convnet3"] == 49.0 and m["acc_std/cifar10/b10/10x1/dm/convnet3"] == 0.5
    assert m["gain/cifar10/b10/5x2/dm/convnet3"] == 1.5
    assert "gain/cifar10/b10/5x2/dm/vgg11" not in m  # no single-expert cell to compare with
    assert "gain/cifar10/b10/10x1/dm/convnet3" not in m  # a single expert has no gain over itself
    assert m["acc/pets/b10/5x2/dm/convnet3"] == 20.0  # other data: under its own name, compared with nothing else
    assert m["acc/cifar100/b10/5x2/dm/convnet3"] == 25.0  # a paper dataset: params.yaml's name, whatever the folder
    assert len(m) == 2 * len(cells) + 1


def test_dataset_labels_are_metric_key_safe() -> None:
    assert dataset_label("folder", "cifar10") == "cifar10"
    assert dataset_label("a/b:c?", None) == "a_b_c_"
    assert dataset_label("///", None) == "___"
    assert dataset_label("", None) == "custom"


def test_a_mixture_is_marked_only_beyond_the_seeds_spread() -> None:
    from moedd.report import mark, render_csv, render_latex, render_markdown

    single = _cell(10, 1, 47.5)  # std 0.5 over 3 seeds
    cells = [single, _cell(5, 2, 49.0), _cell(5, 2, 47.9, "vgg11"), _cell(10, 1, 47.5, "vgg11"),
             _cell(5, 2, 46.0, "resnet18"), _cell(10, 1, 47.5, "resnet18")]
    spread = (0.5**2 + 0.5**2) ** 0.5  # 0.71
    assert 49.0 - 47.5 > spread and mark(cells[1], cells) == "▲"
    assert abs(47.9 - 47.5) < spread and mark(cells[2], cells) == ""
    assert 46.0 - 47.5 < -spread and mark(cells[4], cells) == "▼"
    assert mark(single, cells) == ""  # a single expert is the reference, never marked
    one_seed = [Cell("dm", "convnet3", 10, 5, 2, 49.0, 0.0, 1, "mixup", 300, "c10", "cifar10"), single]
    assert mark(one_seed[0], one_seed) == ""  # one seed has no spread: no claim
    md = render_markdown(cells)
    assert "▲49.00 ± 0.50 (n=3)" in md and "▼46.00" in md and "sqrt(std_mix² + std_single²)" in md
    assert "| — |" in md  # the paper's b20 columns are empty here
    rows = render_csv(cells).splitlines()
    assert rows[0] == ("dataset,budget,config,method,net,mean,std,n,single_mean,gain,mark,paper,variant,"
                       "random_mean,full_mean,norm_gain")
    assert "cifar10,10,5x2,dm,convnet3,49.00,0.50,3,47.50,1.50,▲,,,,," in rows
    tex = render_latex(cells)
    assert r"\begin{tabular}" in tex and r"$\blacktriangle$49.00 $\pm$ 0.50" in tex and "\\end{tabular}" in tex


def test_the_figure_draws_every_panel(tmp_path) -> None:
    """One panel per (dataset, budget): a real PNG of the expected height (3.2 in per panel)."""
    from PIL import Image

    from moedd.report_figure import render_figure

    cells = [_cell(5, 2, 49.0), _cell(10, 1, 47.5), _cell(5, 2, 30.0, paper=None, name="pets"),
             Cell("dm", "convnet3", 20, 10, 2, 55.0, 0.4, 3, "mixup", 300, "c10", "cifar10")]
    render_figure(cells, tmp_path / "t.png")
    with Image.open(tmp_path / "t.png") as img:
        assert img.format == "PNG" and img.height == round(3 * 3.2 * 110)  # cifar10 b10, cifar10 b20, pets b10


def test_ablation_variants_get_their_own_rows_against_the_same_single_expert(tmp_path) -> None:
    """A λ=0 run and a no-fusion evaluation of the same method and budget: rows of their own,
    named in the protocol line, each compared with the one single expert; the default row keeps
    the paper's value where it has one, a variant never does."""
    import json

    from moedd.report import collect, render_csv, render_markdown, run_metrics

    base = {"method": "dm", "budget": 10, "dataset": "cifar10", "paper_dataset": "c10", "epochs": 300, "scale": "cpu"}
    files = {
        "single": {**base, "ipc": 10, "noe": 1, "fusion": "none", "dcor_weight": 0.1, "accs": [47.0, 48.0]},
        "mix": {**base, "ipc": 5, "noe": 2, "fusion": "mixup", "dcor_weight": 0.1, "dcor_estimator": "bias_corrected",
                "accs": [49.0, 50.0]},
        "dcor0": {**base, "ipc": 5, "noe": 2, "fusion": "mixup", "dcor_weight": 0.0, "accs": [46.0, 46.2]},
        "nofusion": {**base, "ipc": 5, "noe": 2, "fusion": "none", "dcor_weight": 0.1, "dcor_estimator": "bias_corrected",
                     "accs": [44.0, 44.4]},
    }
    paths = []
    for name, d in files.items():
        accs = d.pop("accs")
        d["nets"] = {"convnet3": {"mean": sum(accs) / 2, "std": abs(accs[0] - accs[1]) / 2, "accs": accs}}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(d))
    cells = collect(paths)
    assert sorted(c.variant for c in cells) == ["", "", "no fusion", "λ=0"]
    md = render_markdown(cells)
    assert "| DM | ConvNet-3 | ▲49.50 ± 0.50 (n=2) |" in md
    assert "| DM (no fusion) | ConvNet-3 | ▼44.20 ± 0.20 (n=2) |" in md
    assert "| DM (λ=0) | ConvNet-3 | ▼46.10 ± 0.10 (n=2) |" in md
    assert "Scale: cpu." in md and "Ablations: λ=0 = no diversity term" in md and "no fusion = the experts' images" in md
    m = run_metrics(cells)
    assert m["gain/cifar10/b10/5x2/dm-dcor0/convnet3"] == -1.4 and m["gain/cifar10/b10/5x2/dm-nofusion/convnet3"] == -3.3
    assert m["acc/cifar10/b10/5x2/dm/convnet3"] == 49.5
    assert "cifar10,10,5x2,dm,convnet3,46.10,0.10,2,47.50,-1.40,▼,,λ=0,,," in render_csv(cells).splitlines()
    idm = Cell("idm", "convnet3", 10, 5, 2, 50.0, 0.1, 2, "mixup", 300, "c10", "cifar10", "cpu")
    assert idm.paper == 49.04 and Cell(**{**idm.__dict__, "variant": "λ=0"}).paper is None


def test_cells_sit_between_random_real_images_and_the_full_training_set(tmp_path) -> None:
    """The normalised gain (acc − random) / (full − random) per cell, from the random cell of the
    same configuration and network and the full-data reference of the network; in the table, the
    CSV and the metrics, with the reference line and the rule."""
    import json

    from moedd.report import collect_references, merge_cells, render_csv, render_markdown, with_references

    ref = tmp_path / "convnet3.json"
    ref.write_text(json.dumps({"net": "convnet3", "dataset": "cifar10", "paper_dataset": "c10", "images": 50000,
                               "epochs": 10, "seeds": [0], "scale": "cpu", "mean": 70.0, "std": 0.0, "accs": [70.0]}))
    refs = collect_references([ref])
    cells = [_cell(5, 2, 50.0), _cell(10, 1, 48.0), Cell("random", "convnet3", 10, 5, 2, 30.0, 0.5, 3, "mixup", 300, "c10", "cifar10"),
             _cell(5, 2, 40.0, "vgg11")]
    cells = with_references(cells, refs)
    dm = cells[0]
    assert dm.random == 30.0 and dm.full == refs[0] and dm.norm_gain == (50.0 - 30.0) / (70.0 - 30.0)
    assert cells[1].norm_gain is None  # no random cell at 10x1
    assert cells[2].norm_gain is None and cells[3].norm_gain is None  # the random cell itself; no VGG11 reference
    md = render_markdown(cells)
    assert "▲50.00 ± 0.50 (n=3) g 0.50 |" in md
    assert "Full real training set (50,000 images): ConvNet-3 70.00 (n=1, 10 epochs, scale cpu)." in md
    assert "g: normalised gain (acc − random) / (full − random)" in md
    assert "cifar10,10,5x2,dm,convnet3,50.00,0.50,3,48.00,2.00,▲,,,30.00,70.00,0.5000" in render_csv(cells).splitlines()
    m = run_metrics(cells)
    assert m["ngain/cifar10/b10/5x2/dm/convnet3"] == 0.5 and m["full/cifar10/convnet3"] == 70.0
    # another source (a queued experiment) adds only what the first has not
    other = [_cell(5, 2, 10.0), _cell(5, 2, 41.0, "resnet18")]
    merged = merge_cells(cells, other)
    assert len(merged) == 5 and merged[-1].net == "resnet18" and merged[0].mean == 50.0
