"""benchmarks/convergence.py and benchmarks/speed.py: parsing, summaries, and small end-to-end runs.

The smoke tests run every part of the scripts (worker tasks, driver, tables, JSON, plots and
--replot) with a tiny model in seconds; the full-size runs are marked ``long`` (``make test-long``)."""

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import load_script

from smca_d2.speedups.memory import glibc_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    return load_script(f"benchmarks/{name}.py")


@pytest.fixture(scope="module")
def convergence():
    return _load("convergence")


@pytest.fixture(scope="module")
def speed():
    return _load("speed")


# A small single-scale SMCA for the smoke tests: the R50 up to res3 (stride 8), one encoder and
# two decoder layers, ten queries. In-process runs keep this process's malloc settings.
TINY_OPTS = [
    "model.backbone.out_features=[res3]",
    "model.in_features=[res3]",
    "model.transformer.encoder.num_layers=1",
    "model.transformer.decoder.num_layers=2",
    "model.transformer.decoder.dim_feedforward=64",
    "model.num_queries=10",
]
IN_PROCESS_OPTS = TINY_OPTS + ["train.speedups.keep_freed_cpu_memory=False"]


def _write_metrics(path, evals, last_iter, max_iter):
    """A detectron2-style metrics.json: training records every 2 iterations, evaluations at
    the end of each period (0-based iteration) and the final one at max_iter."""
    with open(path, "w") as f:
        for it in range(1, last_iter + 1, 2):
            f.write(json.dumps({"iteration": it, "total_loss": 1.0, "time": 0.5}) + "\n")
        for it, ap in evals:
            record = {
                "iteration": it - 1 if it < max_iter else max_iter,
                "bbox/AP": ap,
                "bbox/AP50": 2 * ap,
                "bbox/AP75": ap / 2,
            }
            f.write(json.dumps(record) + "\n")
        f.write('{"iteration": 9, "trunc')  # a line cut short by a killed run is ignored


def test_read_curve_counts_trained_iterations(convergence, tmp_path):
    path = tmp_path / "metrics.json"
    _write_metrics(str(path), [(5, 1.0), (10, 3.0)], last_iter=9, max_iter=10)
    evals, last, sec = convergence.read_curve(str(path), max_iter=10)
    assert [e["iter"] for e in evals] == [5, 10]
    assert [e["AP"] for e in evals] == [1.0, 3.0] and evals[1]["AP50"] == 6.0
    assert last == 10 and sec == 0.5
    assert convergence.read_curve(str(tmp_path / "missing.json"), 10) == ([], None, None)


def _run(model, seed, aps, iters=(100, 200, 300, 400)):
    return {
        "dataset": "d",
        "model": model,
        "seed": seed,
        "sec_per_iter": 0.1,
        "evaluations": [{"iter": i, "AP": a, "AP50": 2 * a, "AP75": a} for i, a in zip(iters, aps)],
    }


def test_summary_compares_with_the_baseline(convergence):
    runs = [
        _run("detr_baseline", 0, [1.0, 2.0, 3.0, 4.0]),
        _run("detr_baseline", 1, [1.0, 2.0, 3.0, 6.0]),  # final mean 5.0
        _run("smca", 0, [2.0, 6.0, 9.0, 12.0]),
        _run("smca", 1, [2.0, 4.0, 7.0, 8.0]),  # mean 2, 5, 8, 10: reaches 5.0 at 200
        _run("slow", 0, [0.0, 1.0, 2.0, 3.0]),
    ]
    s = convergence.summarize(runs)["d"]
    assert s["smca"]["AP_mean"] == [2.0, 5.0, 8.0, 10.0]
    assert s["smca"]["AP_min"][-1] == 8.0 and s["smca"]["AP_max"][-1] == 12.0
    assert s["smca"]["iters_to_baseline_final_AP"] == 200
    assert s["smca"]["fraction_of_baseline_iters"] == 0.5
    assert s["smca"]["final_AP_ratio_to_baseline"] == 2.0
    assert s["slow"]["iters_to_baseline_final_AP"] is None
    assert s["slow"]["final_AP_ratio_to_baseline"] == pytest.approx(0.6)
    assert "iters_to_baseline_final_AP" not in s["detr_baseline"]
    # The other way round: the baseline's iterations to each model's final AP.
    assert s["slow"]["baseline_iters_to_final_AP"] == 300 and s["slow"]["baseline_iters_ratio"] == 0.75
    assert s["smca"]["baseline_iters_to_final_AP"] is None and s["smca"]["baseline_iters_ratio"] is None
    assert s["smca"]["baseline_AP_at_same_iters"] == 5.0


def test_summary_of_a_longer_baseline(convergence):
    """The baseline trained 10x longer (its own evaluation iterations): the iterations it needs
    to reach the model's AP, as a multiple of the model's."""
    runs = [
        _run("detr_baseline", 0, [1.0, 4.0, 9.0, 12.0], iters=(500, 1000, 1500, 2000)),
        _run("smca", 0, [2.0, 6.0, 9.0, 10.0], iters=(50, 100, 150, 200)),
    ]
    s = convergence.summarize(runs)["d"]["smca"]
    assert s["baseline_iters_to_final_AP"] == 2000 and s["baseline_iters_ratio"] == 10.0
    assert s["iters_to_baseline_final_AP"] is None  # 12.0 is never reached
    assert s["baseline_AP_at_same_iters"] is None  # the baseline is not evaluated at 200


def test_convergence_argument_errors(convergence, tmp_path):
    with pytest.raises(SystemExit):
        convergence.parse_args(["--config", "no-colon-or-equals"])
    with pytest.raises(SystemExit):
        convergence.parse_args(["--config", f"coco:m={tmp_path}/missing.py"])
    with pytest.raises(SystemExit):
        convergence.parse_args(["--datasets", "synthetic", "--models", "no_such_model"])
    with pytest.raises(SystemExit):
        convergence.parse_args(["--datasets", "synthetic", "not-a-key-value"])
    args = convergence.parse_args(
        ["--config", "coco:smca=" + os.path.join(REPO, "configs", "demo", "smca_r18_synthetic.py"), "a.b=1"]
    )
    assert list(args.runs) == [("coco", "smca")] and args.opts == ["a.b=1"]
    args = convergence.parse_args(["--datasets", "synthetic", "--models", "detr_baseline", "train.max_iter=3"])
    assert list(args.runs) == [("synthetic", "detr_baseline")] and args.opts == ["train.max_iter=3"]


def test_convergence_checks_overrides_before_training(convergence, tmp_path, monkeypatch):
    # The multi-scale encoder has no num_layers: training the three models with this override
    # must stop before the first run trains, not after it (a 13-minute loss on the trees).
    trained = []
    monkeypatch.setattr(convergence, "run_one", lambda *a, **k: trained.append(a) or 0.0)
    override = "model.transformer.encoder.num_layers=0"
    with pytest.raises(SystemExit, match="(?s)smca_multi_scale.*encoder.num_layers"):
        convergence.main(["--datasets", "synthetic", "--output", str(tmp_path), override])
    assert trained == []
    # Left out with --models, the multi-scale run is only left out of the report.
    args = convergence.parse_args(
        [
            "--datasets",
            "synthetic",
            "--models",
            "smca_single_scale",
            "detr_baseline",
            "--output",
            str(tmp_path),
            override,
        ]
    )
    assert list(convergence.check_overrides(args)) == [
        ("synthetic", "smca_single_scale"),
        ("synthetic", "detr_baseline"),
    ]


def test_convergence_driver_smoke(convergence, tmp_path, monkeypatch, capsys):
    """main() and run_one() with a stand-in for train_net.py (it writes the metrics.json of a run
    evaluated at iterations 2 and 4): the train_net.py command lines, JSON, plot and table; a
    second run reuses the finished runs instead of training again."""
    commands, prepared = [], []

    def fake_train_net(cmd, cwd, stdout, stderr):
        commands.append(cmd)
        value = lambda key: [a.split("=", 1)[1] for a in cmd if a.startswith(key + "=")][-1]  # the last wins
        max_iter, period = int(value("train.max_iter")), int(value("train.eval_period"))
        ap = 2.0 if "smca_single_scale" in cmd[cmd.index("--config-file") + 1] else 1.0
        evals = [(it, ap * it / 2) for it in range(period, max_iter + 1, period)]
        _write_metrics(os.path.join(value("train.output_dir"), "metrics.json"), evals, max_iter - 1, max_iter)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(convergence, "subprocess", types.SimpleNamespace(run=fake_train_net, STDOUT=subprocess.STDOUT))
    monkeypatch.setattr(convergence, "ensure_dataset", prepared.append)
    out = tmp_path / "conv"
    argv = [
        "--datasets",
        "synthetic",
        "--models",
        "smca_single_scale",
        "detr_baseline",
        "--output",
        str(out),
        "train.max_iter=4",
        "train.eval_period=2",
    ]
    report = convergence.main(argv)
    printed = capsys.readouterr().out
    assert prepared == ["synthetic", "synthetic"] and len(commands) == 2
    smca_cmd, baseline_cmd = commands
    for cmd in commands:
        assert cmd[1].endswith("train_net.py") and "train.seed=0" in cmd
    # The baseline trains 10x the iterations (--baseline-factor), evaluated every 5x the period.
    assert smca_cmd[-2:] == argv[-2:]
    assert baseline_cmd[-4:] == argv[-2:] + ["train.max_iter=40", "train.eval_period=10"]
    runs = {r["model"]: r for r in report["runs"]}
    assert set(runs) == {"smca_single_scale", "detr_baseline"}
    assert [e["iter"] for e in runs["smca_single_scale"]["evaluations"]] == [2, 4]
    assert [e["iter"] for e in runs["detr_baseline"]["evaluations"]] == [10, 20, 30, 40]
    assert runs["detr_baseline"]["max_iter"] == 40 and runs["detr_baseline"]["overrides"] == baseline_cmd[-4:]
    smca = report["summary"]["synthetic"]["smca_single_scale"]
    # SMCA: AP 4 at 4 iterations; the baseline (AP = it / 2) reaches 4 at 10 iterations.
    assert smca["final_AP_ratio_to_baseline"] == 0.2
    assert smca["baseline_iters_to_final_AP"] == 10 and smca["baseline_iters_ratio"] == 2.5
    assert json.loads((out / "convergence.json").read_text())["runs"] == report["runs"]
    assert (out / "convergence.png").stat().st_size > 1000
    assert "| synthetic | smca_single_scale |" in printed

    again = convergence.main(argv)
    assert len(commands) == 2  # nothing retrained
    assert [r["evaluations"] for r in again["runs"]] == [r["evaluations"] for r in report["runs"]]
    assert all(r["wall_s"] is None for r in again["runs"])  # read back, not trained


@pytest.mark.long
def test_convergence_end_to_end(tmp_path):
    """Two models trained by train_net.py, 4 iterations, evaluated every 2: JSON, plot and table;
    a second run reuses the finished runs instead of training again (minutes on 2 cores)."""
    from smca_d2.data.synthetic import make_synthetic_coco

    make_synthetic_coco(str(tmp_path / "data" / "synthetic"), num_train=8, num_val=3, seed=1)
    out = tmp_path / "conv"
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "convergence.py"),
        "--datasets",
        "synthetic",
        "--models",
        "smca_single_scale",
        "detr_baseline",
        "--baseline-factor",
        "2",
        "--output",
        str(out),
        "train.max_iter=4",
        "train.eval_period=2",
        # metrics.json gets the latest value of each metric at each write: with writes less often
        # than evaluations (the config's log_period is 50), evaluations would be left out.
        "train.log_period=1",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "model.transformer.decoder.num_layers=2",
    ]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "data"))
    run = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((out / "convergence.json").read_text())
    assert {(r["model"], r["seed"]) for r in report["runs"]} == {("smca_single_scale", 0), ("detr_baseline", 0)}
    for r in report["runs"]:
        expected = [2, 4, 6, 8] if r["model"] == "detr_baseline" else [2, 4]  # twice the iterations
        assert [e["iter"] for e in r["evaluations"]] == expected
        assert all(0 <= e["AP"] <= 100 for e in r["evaluations"])
    assert "baseline_iters_to_final_AP" in report["summary"]["synthetic"]["smca_single_scale"]
    assert (out / "convergence.png").stat().st_size > 1000
    assert "| synthetic | smca_single_scale |" in run.stdout

    again = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train_net.py" not in again.stdout  # nothing retrained
    rerun = json.loads((out / "convergence.json").read_text())["runs"]
    assert [r["evaluations"] for r in rerun] == [r["evaluations"] for r in report["runs"]]
    assert all(r["wall_s"] is None for r in rerun)  # read back, not trained


def test_speed_arguments(speed):
    assert speed.parse_size("800x1066") == (800, 1066)
    with pytest.raises(argparse.ArgumentTypeError, match="expected HxW"):
        speed.parse_size("800")
    with pytest.raises(SystemExit):
        speed.parse_args(["--amp"])  # AMP needs CUDA
    with pytest.raises(SystemExit):
        speed.parse_args(["--device", "tpu"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--official-repo", "/nonexistent/SMCA-DETR"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--opts", "no-equals-sign"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--variants", "no_such_variant"])
    args = speed.parse_args(["--variants", "ours_plain", "official"])
    assert args.variants == ["ours", "ours_plain", "official"]  # ours always, first
    assert speed.chosen_variants(speed.TRAIN_VARIANTS, args) == {  # the official code needs its checkout
        "ours": speed.TRAIN_VARIANTS["ours"],
        "ours_plain": speed.TRAIN_VARIANTS["ours_plain"],
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_speed_without_cuda_says_so(speed, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_speed_variants_are_speedup_options(speed):
    """Every variant of ours is the config's train.speedups with some options changed (None: the
    plain model), so that "ours" is what train_net.py trains and "ours_optimized" what
    LazyPredictor runs."""
    from smca_d2.speedups import DEFAULT_SPEEDUPS

    for catalog in (speed.INFERENCE_VARIANTS, speed.TRAIN_VARIANTS):
        assert catalog["ours"] == {"impl": "ours", "speedups": {}}
        assert catalog["ours_plain"] == {"impl": "ours", "speedups": None}
        for v in catalog.values():
            assert v["impl"] == "official" or v["speedups"] is None or set(v["speedups"]) <= set(DEFAULT_SPEEDUPS)
    assert speed.INFERENCE_VARIANTS["ours_optimized"]["optimize"] is True
    assert speed.INFERENCE_VARIANTS["ours_default_malloc"]["speedups"] == {"keep_freed_cpu_memory": False}
    assert speed.TRAIN_VARIANTS["ours_torch_dropout"]["speedups"] == {"fast_cpu_dropout": False}
    assert speed.TRAIN_VARIANTS["ours_channels_last"]["speedups"] == {"channels_last": True}


def test_speed_output_comparison(speed, tmp_path):
    layers = [(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)) for _ in range(2)]
    other = [(x.clone(), y.clone()) for x, y in layers]
    other[1][0][0, 0, 0] = 0.5
    torch.save(layers, tmp_path / "a.pt")
    torch.save(other, tmp_path / "b.pt")
    d = speed.max_abs_diff(str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))
    assert d == {"max_abs_logits": 0.5, "max_abs_boxes": 0.0, "layers": 2}


def test_median_of_rounds(speed):
    from speed_report import round_speedups

    rounds = [
        {"s_per_iter": 3.0, "peak_mem_mib": 10.0, "times": [3.0]},
        {"s_per_iter": 1.0, "peak_mem_mib": 30.0, "times": [1.0]},
        {"s_per_iter": 2.0, "peak_mem_mib": 20.0, "times": [2.0]},
    ]
    merged = speed.median_of_rounds(rounds)
    assert merged["s_per_iter"] == 2.0 and merged["rounds_s_per_iter"] == [3.0, 1.0, 2.0]
    assert merged["peak_mem_mib"] == 20.0 and merged["rounds_peak_mem_mib"] == [10.0, 30.0, 20.0]
    assert merged["times"] == [3.0]
    assert "rounds_s_per_iter" not in rounds[0]  # inputs untouched
    official = {"rounds_s_per_iter": [6.0, 3.0, 3.0]}
    assert round_speedups(merged, official) == [2.0, 3.0, 1.5]
    assert round_speedups(rounds[0], official) is None  # one process, no rounds
    # inference rounds: times per image
    images = speed.median_of_rounds([{"s_per_image": 1.0}, {"s_per_image": 4.0}, {"s_per_image": 2.0}])
    assert images["s_per_image"] == 2.0 and images["rounds_s_per_image"] == [1.0, 4.0, 2.0]
    assert "peak_mem_mib" not in images
    assert round_speedups(images, {"rounds_s_per_image": [2.0, 4.0, 3.0]}) == [2.0, 1.0, 1.5]


def test_run_rounds_interleaves_variants(speed):
    class Driver:
        calls = []

        def run(self, **spec):
            self.calls.append((spec["impl"], spec.get("optimize", False), spec["task"]))
            return {"s_per_image": float(len(self.calls))}

    drv = Driver()
    rows = speed.run_rounds(
        drv, {"ours": dict(impl="ours"), "opt": dict(impl="ours", optimize=True)}, 2, task="inference"
    )
    assert drv.calls == [("ours", False, "inference"), ("ours", True, "inference")] * 2
    assert rows["ours"]["rounds_s_per_image"] == [1.0, 3.0] and rows["opt"]["rounds_s_per_image"] == [2.0, 4.0]


def test_tensor_peak_counts_what_one_call_holds_at_once():
    from speed_worker import tensor_peak_mib

    keep = torch.zeros(4 * 2**18)  # exists before the call: not counted

    def call():
        a = torch.ones(8 * 2**18)  # 8 MiB
        b = torch.ones(4 * 2**18)  # 4 MiB: 12 MiB held at once
        del a
        c = torch.ones(2 * 2**18)  # 6 MiB
        return float(b.sum() + c.sum() + keep.sum())

    assert tensor_peak_mib(call) == pytest.approx(12.0, abs=0.01)
    assert tensor_peak_mib(lambda: None) == 0.0


def _worker_spec(task, **variant):
    return {
        "device": "cpu",
        "threads": None,
        "warmup": 0,
        "repeats": 1,
        "train_warmup": 0,
        "seed": 0,
        "official_repo": None,
        "batch": 2,
        "opts": IN_PROCESS_OPTS,
        "model": "smca_single_scale",
        "size": [64, 64],
        "task": task,
        **variant,
    }


def test_worker_builds_each_variant_with_its_speedups(monkeypatch):
    """ours: train_net.py's speed-ups; optimized: LazyPredictor's (training=False); plain: none."""
    import speed_models

    from smca_d2 import speedups

    calls = []
    real = speedups.apply_speedups
    monkeypatch.setattr(
        speedups,
        "apply_speedups",
        lambda model, options, **kw: calls.append((options, kw)) or real(model, options, **kw),
    )
    ours = speed_models.build_model(_worker_spec("train", impl="ours", speedups={"channels_last": True}))
    ((options, kw),) = calls
    assert options["channels_last"] is True and options["fuse_frozen_bn"] is True and kw["training"] is True
    assert options["keep_freed_cpu_memory"] is False  # from --opts: the config's, with the variant's on top
    assert ours.model.backbone.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    speed_models.build_model(_worker_spec("inference", impl="ours", speedups={}, optimize=True))
    assert calls[1][1]["training"] is False
    speed_models.build_model(_worker_spec("inference", impl="ours", speedups=None))
    assert len(calls) == 2  # the plain model gets none


def test_worker_inference_and_outputs(tmp_path, speed, monkeypatch):
    from speed_worker import run_worker

    from smca_d2.speedups import memory

    monkeypatch.setattr(memory, "_applied", False)  # as in the worker's own fresh process

    plain = run_worker(_worker_spec("inference", impl="ours", speedups=None))
    optimized = run_worker(_worker_spec("inference", impl="ours", speedups={}, optimize=True))
    for r in (plain, optimized):
        assert r["s_per_image"] > 0 and len(r["times"]) == 1 and r["tensor_peak_mib"] > 0
        assert r["keep_freed_memory"] is False and r["params"] > 0
    for name, variant in (("plain", dict(speedups=None)), ("optimized", dict(speedups={}, optimize=True))):
        run_worker(_worker_spec("outputs", impl="ours", batch=2, save=str(tmp_path / f"{name}.pt"), **variant))
    d = speed.max_abs_diff(str(tmp_path / "plain.pt"), str(tmp_path / "optimized.pt"))
    assert d["layers"] == 2 and d["max_abs_logits"] < 1e-3 and d["max_abs_boxes"] < 1e-3


def test_worker_train():
    from speed_worker import run_worker

    train = run_worker(_worker_spec("train", impl="ours", speedups={}))
    assert train["s_per_iter"] > 0 and len(train["times"]) == 1 and train["initial_loss_no_dropout"] > 0
    assert train["tensor_peak_mib"] > 0


def test_worker_profile():
    from speed_worker import run_worker

    p = run_worker(_worker_spec("profile", impl="ours", speedups={}, batch=1))
    assert set(p["inference_parts_s"]) >= {"backbone", "encoder", "decoder", "gaussian_prior"}
    assert 0 < p["inference_parts_s"]["backbone"] < p["inference_total_s"]
    assert p["train_parts_s"]["matcher"] > 0 and p["train_backward_and_step_s"] > 0
    kinds = p["train_op_kinds_s"]
    assert kinds["convolution"] > 0 and kinds["matrix products"] > 0 and kinds["dropout random numbers"] > 0


def _fake_result(spec):
    """What speed_worker.run_worker returns for ``spec``, with times that tell variants apart:
    the plain model takes 2 s, ours 1 s, the optimized 0.8 s, the official code 3 s."""
    if spec["task"] == "outputs":
        layers = [(torch.zeros(spec["batch"], 10, 92), torch.full((spec["batch"], 10, 4), 0.5))] * 2
        torch.save(layers, spec["save"])
        return {"params": 1}
    if spec["impl"] == "official":
        t = 3.0
    else:
        t = 2.0 if spec["speedups"] is None else 0.8 if spec.get("optimize") else 1.0
    mem = {"peak_mem_mib": 100.0 * t, "tensor_peak_mib": 50.0 * t, "keep_freed_memory": spec["speedups"] is not None}
    if spec["task"] == "inference":
        return {"params": 1, "s_per_image": t, "times": [t], **mem}
    if spec["task"] == "train":
        return {"params": 1, "s_per_iter": 4 * t, "times": [4 * t], "initial_loss_no_dropout": 20.0, **mem}
    parts = {"backbone": 0.5 * t, "encoder": 0.1, "decoder": 0.1, "gaussian_prior": 0.01, "matcher": 0.01}
    return {
        "params": 1,
        "inference_total_s": t,
        "inference_parts_s": parts,
        "train_parts_s": parts,
        "train_forward_and_loss_s": t,
        "train_backward_and_step_s": 2 * t,
        "train_op_kinds_s": {
            "convolution": t,
            "matrix products": t,
            "dropout random numbers": 0.1,
            "everything else": t,
        },
    }


def test_speed_driver_tables_json_and_replot(speed, tmp_path, monkeypatch, capsys):
    """The driver's whole run with a stand-in for the worker process: every section, variant and
    round lands in the JSON, the tables and the plot, and --replot reads the JSON back."""
    specs = []
    monkeypatch.setattr(speed.Driver, "launch", lambda self, spec, desc: specs.append(spec) or _fake_result(spec))
    out = tmp_path / "speed.json"
    speed.main(
        [
            "--sizes",
            "64x64",
            "--train-size",
            "64x64",
            "--scaling-sizes",
            "64x64",
            "--scaling-queries",
            "20",
            "--models",
            "smca_single_scale",
            "detr_baseline",
            "--train-rounds",
            "2",
            "--inference-rounds",
            "2",
            "--opts",
            *TINY_OPTS,
            "--output",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["settings"]["opts"] == TINY_OPTS and all(s["opts"] == TINY_OPTS for s in specs)
    inference, train = r["single_scale"]["inference"][0], r["single_scale"]["train"][0]
    assert set(inference) >= {"ours", "ours_optimized", "ours_plain", "ours_default_malloc"}
    assert set(train) >= {"ours", "ours_plain", "ours_channels_last", "ours_torch_dropout"}
    assert "official" not in train and not r["official"]
    assert inference["speed_up_over_plain"] == {"ours": 2.0, "ours_optimized": 2.5, "ours_default_malloc": 2.0}
    assert train["speed_up_over_plain"]["ours"] == 2.0
    assert train["ours"]["rounds_s_per_iter"] == [4.0, 4.0]
    # interleaved rounds of the variants: v1 v2 v3 v4 v1 v2 ...
    trains = [s for s in specs if s["task"] == "train" and s["model"] == "smca_single_scale"]
    assert [s["speedups"] for s in trains[:4]] == [s["speedups"] for s in trains[4:]]
    # outputs: optimized vs ours and ours vs the plain model, batches 1 and 2
    assert sorted(r["single_scale"]["equal_outputs"]) == sorted(
        f"{a} vs {b}, batch {n}, 64x64" for a, b in [("ours_optimized", "ours"), ("ours", "ours_plain")] for n in (1, 2)
    )
    assert all(d["pass"] for d in r["single_scale"]["equal_outputs"].values())
    assert r["profile"]["ours"]["train_op_kinds_s"]["convolution"] == 1.0
    assert r["other_models"][0]["model"] == "detr_baseline" and r["other_models"][0]["train"]["s_per_iter"] == 4.0
    assert r["scaling"]["queries"][0] == {"num_queries": 20, "ours": 1.0}
    for text in (
        "| inference | 64x64 | fp32 | 1.000 s/img |",
        "| inference, optimized | 64x64 | fp32 | 0.800 s/img |",
        "| inference, plain model (no speed-ups) | 64x64 | fp32 | 2.000 s/img |",
        "| inference, both with glibc's default malloc | 64x64 |",
        "| train (batch 2) | 64x64 | fp32 | 4.000 s/iter |",
        "| train (batch 2), torch's dropout masks |",
        "| train (batch 2), channels-last |",
        "what the speed-ups buy",
        "| inference | 64x64 | fp32 | 2.000 | 1.000 | 2.00x | 0.800 | 2.50x |",
        "| train (batch 2) | 64x64 | fp32 | 8.000 | 4.000 | 2.00x | - | - |",
        "where the time goes",
        "by kind of operator",
        "other models (ours)",
        "vs image size",
    ):
        assert text in printed, text
    assert (tmp_path / "speed.png").stat().st_size > 1000
    (tmp_path / "speed.png").unlink()
    speed.main(["--replot", str(out)])
    assert "what the speed-ups buy" in capsys.readouterr().out and (tmp_path / "speed.png").stat().st_size > 1000


def test_speed_replots_the_published_report(speed, tmp_path, capsys):
    """docs/benchmarks/speed.json (written by an earlier version, with the official code) still
    reads: --replot prints its tables and draws its plot."""
    copy = tmp_path / "speed.json"
    copy.write_text(Path(REPO, "docs", "benchmarks", "speed.json").read_text())
    report = speed.main(["--replot", str(copy)])
    printed = capsys.readouterr().out
    assert report["official"] and "| inference, optimized | 800x1066 | fp32 |" in printed
    assert "vs official with the same malloc setting" in printed and "what the speed-ups buy" not in printed
    assert (tmp_path / "speed.png").stat().st_size > 1000


def test_speed_benchmark_smoke(tmp_path):
    """benchmarks/speed.py as a user runs it, with a worker process, the tiny model and one task
    (the other tasks and sections are run by the tests above)."""
    out = tmp_path / "speed.json"
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "speed.py"),
        "--sizes",
        "64x64",
        "--variants",
        "ours",
        "--models",
        "smca_single_scale",
        "--skip",
        "profile",
        "scaling",
        "train",
        "--warmup",
        "0",
        "--train-warmup",
        "0",
        "--repeats",
        "1",
        "--threads",
        "2",
        "--train-rounds",
        "1",
        "--inference-rounds",
        "1",
        "--output",
        str(out),
        "--opts",
        *TINY_OPTS,
    ]
    run = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    inf = r["single_scale"]["inference"][0]["ours"]
    assert inf["s_per_image"] > 0 and "peak_mem_mib" in inf and inf["tensor_peak_mib"] > 0
    assert inf["keep_freed_memory"] is glibc_malloc()  # train.speedups.keep_freed_cpu_memory, as train_net.py
    assert run.stdout.count("ours     smca_single_scale") == 1 and r["single_scale"]["equal_outputs"] == {}
    assert r["single_scale"]["train"] == [] and "| inference | 64x64 | fp32 |" in run.stdout
    assert (tmp_path / "speed.png").stat().st_size > 1000


@pytest.mark.long
def test_speed_benchmark_ours_full(tmp_path):
    """The whole benchmark (ours only: the official code is not part of this repository), every
    variant, section and model, R50 at a small size, two rounds (minutes on 2 cores)."""
    out = tmp_path / "speed.json"
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "speed.py"),
        "--sizes",
        "64x96",
        "--train-size",
        "64x96",
        "--scaling-sizes",
        "64x64",
        "--scaling-queries",
        "20",
        "--models",
        "smca_single_scale",
        "detr_baseline",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--threads",
        "2",
        "--train-rounds",
        "2",
        "--inference-rounds",
        "2",
        "--output",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    inference, train = r["single_scale"]["inference"][0], r["single_scale"]["train"][0]
    assert len(train["ours"]["rounds_s_per_iter"]) == 2 and len(inference["ours"]["rounds_s_per_image"]) == 2
    assert set(train) >= {"ours", "ours_plain", "ours_channels_last", "ours_torch_dropout"}
    assert set(inference) >= {"ours", "ours_optimized", "ours_plain", "ours_default_malloc"}
    assert inference["ours_default_malloc"]["keep_freed_memory"] is False
    assert inference["ours_plain"]["keep_freed_memory"] is False
    assert set(train["speed_up_over_plain"]) >= {"ours", "ours_channels_last", "ours_torch_dropout"}
    assert all(d["pass"] for d in r["single_scale"]["equal_outputs"].values())
    (eq,) = [d for k, d in r["single_scale"]["equal_outputs"].items() if k.startswith("ours vs ours_plain, batch 2")]
    assert eq["layers"] == 6
    assert r["profile"]["ours"]["train_op_kinds_s"]["dropout random numbers"] > 0
    assert r["other_models"][0]["model"] == "detr_baseline"
    assert "what the speed-ups buy" in run.stdout and "where the time goes" in run.stdout
    replot = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--replot", str(out)],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
    )
    assert replot.returncode == 0 and "where the time goes" in replot.stdout, replot.stderr[-2000:]


@pytest.mark.long
@pytest.mark.skipif(
    not os.environ.get("SMCA_OFFICIAL_REPO"), reason="set SMCA_OFFICIAL_REPO to a checkout of SMCA-DETR"
)
def test_speed_benchmark_against_official(tmp_path):
    """Every variant and the profile of both implementations, one round (minutes on 2 cores)."""
    from speed_report import speedup_limit

    out = tmp_path / "speed.json"
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "speed.py"),
        "--official-repo",
        os.environ["SMCA_OFFICIAL_REPO"],
        "--sizes",
        "128x160",
        "--train-size",
        "128x160",
        "--models",
        "smca_single_scale",
        "--skip",
        "scaling",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--train-warmup",
        "1",
        "--inference-rounds",
        "1",
        "--train-rounds",
        "1",
        "--output",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert all(d["pass"] for d in r["single_scale"]["equal_outputs"].values())
    assert r["single_scale"]["train"][0]["loss_equal"]
    assert "official_same_malloc" in r["single_scale"]["train"][0]
    assert speedup_limit(r)["limit"] > 1


@pytest.mark.parametrize("plain", [False, True])
def test_forward_time_times_the_models_with_and_without_speedups(tmp_path, monkeypatch, capsys, plain):
    forward_time = load_script("benchmarks/forward_time.py")
    applied = []
    monkeypatch.setattr(forward_time, "optimize_for_inference", lambda model: applied.append(model) or model)
    out = tmp_path / "forward_time.json"
    argv = ["forward_time.py", "--configs", "detr_baseline_r50_50ep.py", "--size", "64", "96", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", argv + ["--output", str(out)] + (["--plain"] if plain else []))
    forward_time.main()
    record = json.loads(out.read_text())
    assert record["speedups"] is not plain and record["size_hw"] == [64, 96]
    assert record["results"][0]["median_s_per_image"] > 0 and record["results"][0]["trainable_params"] > 0
    assert len(applied) == (0 if plain else 1)
    assert "detr_baseline_r50_50ep.py" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# benchmarks/deployment.py
# ---------------------------------------------------------------------------------------------
def test_deployment_benchmark_smoke(tmp_path):
    """The speed table of the torch paths and the float32 / bfloat16 AP evaluation of a
    checkpoint, on a tiny model and dataset; the docs' renderer takes the JSON. (ONNX Runtime's
    path, whose export the export tests run, is in the long run below.)"""
    from conftest import write_tiny_coco

    from smca_d2.engine import load_config

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import instantiate
    from detectron2.data.datasets import register_coco_instances

    deployment = _load("deployment")
    out = tmp_path / "deployment.json"
    record = deployment.main(
        ["--variants", "eager_fp32", "optimized_fp32", "optimized_bf16", "--configs", "smca_single_scale_r50_50ep.py"]
        + ["--sizes", "64x96", "--rounds", "1", "--output", str(out), *TINY_OPTS]
    )
    (row,) = record["results"]
    assert set(row["variants"]) == {"eager_fp32", "optimized_fp32", "optimized_bf16"}
    assert row["variants"]["eager_fp32"]["max_box_diff_px"] == 0
    assert row["variants"]["optimized_fp32"]["max_box_diff_px"] < 1e-3
    bf16 = row["variants"]["optimized_bf16"]
    assert "skipped" in bf16 or 0 < bf16["max_box_diff_px"] < 5  # rounded, not broken
    assert json.loads(out.read_text())["results"] == record["results"]

    json_path, image_dir = write_tiny_coco(str(tmp_path / "coco"), num_images=3)
    register_coco_instances("smca_deployment_smoke", {}, json_path, image_dir)
    overrides = [
        "dataloader.test.dataset.names=smca_deployment_smoke",
        "model.num_classes=2",
        "model.transformer.decoder.num_layers=2",
        "model.num_queries=10",
    ]
    torch.manual_seed(0)
    model = instantiate(load_config("demo/smca_r18_synthetic.py", overrides).model)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("m")
    checkpoint = str(tmp_path / "m.pth")
    ap = deployment.evaluate_precisions("demo/smca_r18_synthetic.py", checkpoint, "tiny", overrides)
    assert record["precision_ap"] == []  # no --ap given
    assert ap["images"] == 3 and ap["float32"]["s_per_image"] > 0
    assert "AP" in ap["bfloat16"] or "skipped" in ap["bfloat16"]

    tables = load_script("docs/generate_benchmark_tables.py")
    text = tables.render_deployment({**record, "precision_ap": [ap] if "AP" in ap["bfloat16"] else []})
    assert "torch optimized, bfloat16 autocast" in text and "64x96" in text


@pytest.mark.long
def test_deployment_benchmark_with_onnx_runtime(tmp_path):
    deployment = _load("deployment")
    record = deployment.main(
        ["--configs", "smca_single_scale_r50_50ep.py", "--sizes", "64x96", "80x64", "--rounds", "1"]
        + ["--output", str(tmp_path / "d.json"), *TINY_OPTS]
    )
    for row in record["results"]:
        ort = row["variants"]["onnxruntime_fp32"]
        assert ort["classes_equal_fraction"] == 1.0 and ort["max_box_diff_px"] < 1e-2


def test_largest_batch_estimates_from_two_batches_and_backs_off():
    from speed_worker import largest_batch

    # 1000 MiB of weights and state, 100 MiB per image; batches above 40 run out of memory.
    memory = lambda batch: None if batch > 40 else 1000.0 + 100.0 * batch
    batch, limit, tried = largest_batch(memory, budget_mib=6000.0, cap=64)
    assert (batch, limit) == (40, "memory")  # the estimate, 50, and 45 run out of memory; 40 fits
    assert tried == [[2, 1200.0], [4, 1400.0], [50, None], [45, None], [40, 5000.0]]
    assert largest_batch(memory, budget_mib=6000.0, cap=16)[:2] == (16, "cap")
    assert largest_batch(lambda b: None, budget_mib=6000.0, cap=16)[:2] == (None, "batch 2 does not fit")


# ---------------------------------------------------------------------------------------------
# benchmarks/dataset_loading.py
# ---------------------------------------------------------------------------------------------
def _check_dataset_loading_record(record, ranks):
    assert [r["ranks"] for r in record["results"]] == ranks
    for row in record["results"]:
        v = row["variants"]
        assert set(v) == {"detectron2", "detectron2_gc_paused", "ours_first", "ours_repeated"}
        assert len({(x["images"], x["boxes"]) for x in v.values()}) == 1  # the same dicts' sizes
        assert v["ours_first"]["cache_records_before"] == [0] and v["ours_repeated"]["cache_records_before"] == [1]
        assert all(x["seconds"] > 0 and x["peak_rss_mib"] >= x["rss_before_mib"] > 0 for x in v.values())
        assert all(len(per_round) == row["ranks"] for x in v.values() for per_round in x["per_rank"])
        assert set(row["ratios"]["repeated"]) == {"time", "peak_rss", "time_vs_gc_paused", "peak_rss_vs_gc_paused"}
    tables = load_script("docs/generate_benchmark_tables.py")
    text = tables.render_dataset_loading(record)
    assert "| 1 | first (no record) |" in text and "| 1 | repeated (recorded) |" in text
    assert "goal: at most 1.2" in text


def test_dataset_loading_benchmark_smoke(tmp_path, monkeypatch, capsys):
    """The driver on a tiny generated dataset, one rank and one round, with each measurement run in
    this process instead of a fresh one (the long test below starts them); the docs' renderer
    takes the JSON."""
    from smca_d2.data.coco_sized import make_coco_sized_dataset

    bench = _load("dataset_loading")
    root = tmp_path / "coco_sized"
    make_coco_sized_dataset(str(root), num_images=40)
    monkeypatch.setenv("SMCA_D2_DATA_CACHE", str(tmp_path / "unused"))  # measure() sets it; restored after
    monkeypatch.setattr(bench, "run_worker", lambda spec: bench.measure(spec) or bench.read_results(spec))
    out = tmp_path / "dataset_loading.json"
    record = bench.main(["--root", str(root), "--ranks", "1", "--rounds", "1", "--output", str(out)])
    assert json.loads(out.read_text())["results"] == record["results"]
    assert record["dataset"]["image_files"] == 40 and record["environment"]["cpu_model"] is not None
    _check_dataset_loading_record(record, [1])
    assert "repeated run, ours / detectron2" in capsys.readouterr().out


@pytest.mark.long
def test_dataset_loading_benchmark_processes(tmp_path):
    """benchmarks/dataset_loading.py as a user runs it: a process per measurement, 1 and 2 ranks."""
    from smca_d2.data.coco_sized import make_coco_sized_dataset

    root = tmp_path / "coco_sized"
    make_coco_sized_dataset(str(root), num_images=40)
    out = tmp_path / "dataset_loading.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "dataset_loading.py"), "--root", str(root)]
    run = subprocess.run(cmd + ["--rounds", "1", "--output", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    _check_dataset_loading_record(json.loads(out.read_text()), [1, 2])
