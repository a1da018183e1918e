"""benchmarks/convergence.py and benchmarks/speed.py: parsing, summaries, and small end-to-end runs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from smca_d2.speedups.memory import glibc_malloc

from conftest import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    return load_script(f"benchmarks/{name}.py")


@pytest.fixture(scope="module")
def convergence():
    return _load("convergence")


@pytest.fixture(scope="module")
def speed():
    return _load("speed")


def _write_metrics(path, evals, last_iter, max_iter):
    """A detectron2-style metrics.json: training records every 2 iterations, evaluations at
    the end of each period (0-based iteration) and the final one at max_iter."""
    with open(path, "w") as f:
        for it in range(1, last_iter + 1, 2):
            f.write(json.dumps({"iteration": it, "total_loss": 1.0, "time": 0.5}) + "\n")
        for it, ap in evals:
            record = {"iteration": it - 1 if it < max_iter else max_iter, "bbox/AP": ap,
                      "bbox/AP50": 2 * ap, "bbox/AP75": ap / 2}
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
    return {"dataset": "d", "model": model, "seed": seed, "sec_per_iter": 0.1,
            "evaluations": [{"iter": i, "AP": a, "AP50": 2 * a, "AP75": a} for i, a in zip(iters, aps)]}


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


def test_convergence_argument_errors(convergence, tmp_path):
    with pytest.raises(SystemExit):
        convergence.parse_args(["--config", "no-colon-or-equals"])
    with pytest.raises(SystemExit):
        convergence.parse_args(["--config", f"coco:m={tmp_path}/missing.py"])
    with pytest.raises(SystemExit):
        convergence.parse_args(["--datasets", "synthetic", "--models", "no_such_model"])
    with pytest.raises(SystemExit):
        convergence.parse_args(["--datasets", "synthetic", "not-a-key-value"])
    args = convergence.parse_args(["--config", "coco:smca=" + os.path.join(REPO, "configs", "demo", "smca_r18_synthetic.py"), "a.b=1"])
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
    args = convergence.parse_args(["--datasets", "synthetic", "--models", "smca_single_scale", "detr_baseline",
                                   "--output", str(tmp_path), override])
    assert list(convergence.check_overrides(args)) == [("synthetic", "smca_single_scale"),
                                                       ("synthetic", "detr_baseline")]


@pytest.mark.slow
def test_convergence_end_to_end(tmp_path):
    """Two models, 4 iterations, evaluated every 2: JSON, plot and table; a second run reuses the
    finished runs instead of training again."""
    from smca_d2.data.synthetic import make_synthetic_coco

    make_synthetic_coco(str(tmp_path / "data" / "synthetic"), num_train=8, num_val=3, seed=1)
    out = tmp_path / "conv"
    cmd = [
        sys.executable, os.path.join(REPO, "benchmarks", "convergence.py"), "--datasets", "synthetic",
        "--models", "smca_single_scale", "detr_baseline", "--output", str(out),
        "train.max_iter=4", "train.eval_period=2", "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "model.transformer.decoder.num_layers=2",
    ]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "data"), OMP_NUM_THREADS="2")
    run = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((out / "convergence.json").read_text())
    assert {(r["model"], r["seed"]) for r in report["runs"]} == {("smca_single_scale", 0), ("detr_baseline", 0)}
    for r in report["runs"]:
        assert [e["iter"] for e in r["evaluations"]] == [2, 4]
        assert all(0 <= e["AP"] <= 100 for e in r["evaluations"])
    assert "final_AP_ratio_to_baseline" in report["summary"]["synthetic"]["smca_single_scale"]
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
    with pytest.raises(Exception):
        speed.parse_size("800")
    with pytest.raises(SystemExit):
        speed.parse_args(["--amp"])  # AMP needs CUDA
    with pytest.raises(SystemExit):
        speed.parse_args(["--device", "tpu"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--official-repo", "/nonexistent/SMCA-DETR"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_speed_without_cuda_says_so(speed, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_speed_output_comparison(speed, tmp_path):
    layers = [(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)) for _ in range(2)]
    other = [(x.clone(), y.clone()) for x, y in layers]
    other[1][0][0, 0, 0] = 0.5
    torch.save(layers, tmp_path / "a.pt")
    torch.save(other, tmp_path / "b.pt")
    d = speed.max_abs_diff(str(tmp_path / "a.pt"), str(tmp_path / "b.pt"))
    assert d == {"max_abs_logits": 0.5, "max_abs_boxes": 0.0, "layers": 2}


def test_median_of_rounds(speed):
    rounds = [{"s_per_iter": 3.0, "peak_mem_mib": 10.0, "times": [3.0]},
              {"s_per_iter": 1.0, "peak_mem_mib": 30.0, "times": [1.0]},
              {"s_per_iter": 2.0, "peak_mem_mib": 20.0, "times": [2.0]}]
    merged = speed.median_of_rounds(rounds)
    assert merged["s_per_iter"] == 2.0 and merged["rounds_s_per_iter"] == [3.0, 1.0, 2.0]
    assert merged["peak_mem_mib"] == 20.0 and merged["rounds_peak_mem_mib"] == [10.0, 30.0, 20.0]
    assert merged["times"] == [3.0]
    assert "rounds_s_per_iter" not in rounds[0]  # inputs untouched
    official = {"rounds_s_per_iter": [6.0, 3.0, 3.0]}
    assert speed.round_speedups(merged, official) == [2.0, 3.0, 1.5]
    assert speed.round_speedups(rounds[0], official) is None  # one process, no rounds
    # inference rounds: times per image
    images = speed.median_of_rounds([{"s_per_image": 1.0}, {"s_per_image": 4.0}, {"s_per_image": 2.0}])
    assert images["s_per_image"] == 2.0 and images["rounds_s_per_image"] == [1.0, 4.0, 2.0]
    assert "peak_mem_mib" not in images
    assert speed.round_speedups(images, {"rounds_s_per_image": [2.0, 4.0, 3.0]}) == [2.0, 1.0, 1.5]


def test_run_rounds_interleaves_variants(speed):
    class Driver:
        calls = []

        def run(self, **spec):
            self.calls.append((spec["impl"], spec.get("optimize", False), spec["task"]))
            return {"s_per_image": float(len(self.calls))}

    drv = Driver()
    rows = speed.run_rounds(drv, {"ours": dict(impl="ours"), "opt": dict(impl="ours", optimize=True)}, 2,
                            task="inference")
    assert drv.calls == [("ours", False, "inference"), ("ours", True, "inference")] * 2
    assert rows["ours"]["rounds_s_per_image"] == [1.0, 3.0] and rows["opt"]["rounds_s_per_image"] == [2.0, 4.0]


def test_tensor_peak_counts_what_one_call_holds_at_once(speed):
    keep = torch.zeros(4 * 2**18)  # exists before the call: not counted

    def call():
        a = torch.ones(8 * 2**18)  # 8 MiB
        b = torch.ones(4 * 2**18)  # 4 MiB: 12 MiB held at once
        del a
        c = torch.ones(2 * 2**18)  # 6 MiB
        return float(b.sum() + c.sum() + keep.sum())

    assert speed.tensor_peak_mib(call) == pytest.approx(12.0, abs=0.01)
    assert speed.tensor_peak_mib(lambda: None) == 0.0


@pytest.mark.slow
def test_speed_benchmark_ours_small(tmp_path):
    """The whole benchmark (ours only: the official code is not part of this repository) at a
    tiny size: every section runs in its own process and lands in the JSON and the tables."""
    out = tmp_path / "speed.json"
    cmd = [
        sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--sizes", "64x96",
        "--train-size", "64x96", "--scaling-sizes", "64x64", "--scaling-queries", "20",
        "--models", "smca_single_scale", "detr_baseline", "--warmup", "0", "--repeats", "1",
        "--threads", "2", "--train-rounds", "2", "--inference-rounds", "2", "--output", str(out),
    ]
    run = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    inf, train = r["single_scale"]["inference"][0]["ours"], r["single_scale"]["train"][0]["ours"]
    assert inf["s_per_image"] > 0 and train["s_per_iter"] > 0 and train["initial_loss_no_dropout"] > 0
    assert len(train["rounds_s_per_iter"]) == 2 and run.stdout.count("ours     smca_single_scale train") == 2 * 3
    assert train["peak_mem_mib"] > 0 and len(train["rounds_peak_mem_mib"]) == 2
    assert len(inf["rounds_s_per_image"]) == 2 and run.stdout.count("ours     smca_single_scale inference") >= 2 * 2
    assert inf["tensor_peak_mib"] > 0 and train["tensor_peak_mib"] > inf["tensor_peak_mib"]
    assert "peak tensors ours (MiB)" in run.stdout
    # ours also with glibc's default malloc, as the official code runs
    default_malloc = r["single_scale"]["inference"][0]["ours_default_malloc"]
    assert default_malloc["s_per_image"] > 0 and "keep_freed_memory" not in default_malloc
    assert "| inference, both with glibc's default malloc | 64x96 |" in run.stdout
    parts = r["profile"]["ours"]["inference_parts_s"]
    assert set(parts) >= {"backbone", "encoder", "decoder", "gaussian_prior"}
    assert 0 < parts["backbone"] < r["profile"]["ours"]["inference_total_s"]
    assert r["profile"]["ours"]["train_parts_s"]["matcher"] > 0
    kinds = r["profile"]["ours"]["train_op_kinds_s"]
    assert kinds["convolution"] > 0 and kinds["matrix products"] > 0 and kinds["dropout random numbers"] > 0
    assert "by kind of operator" in run.stdout
    if glibc_malloc():
        assert train["keep_freed_memory"] is True  # as train_net.py runs on the CPU
    assert r["other_models"][0]["model"] == "detr_baseline"
    assert r["scaling"]["queries"][0]["num_queries"] == 20
    assert "where the time goes" in run.stdout and "| inference | 64x96 | fp32 |" in run.stdout
    assert "| inference, optimized | 64x96 | fp32 |" in run.stdout
    # ours also trained with torch's dropout masks (model.fast_cpu_dropout=False), side by side
    assert r["single_scale"]["train"][0]["ours_torch_dropout"]["s_per_iter"] > 0
    assert "torch's dropout masks" in run.stdout
    (eq,) = [d for k, d in r["single_scale"]["equal_outputs"].items() if "batch 2" in k]
    assert eq["pass"] and eq["layers"] == 6
    assert (tmp_path / "speed.png").stat().st_size > 1000
    replot = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--replot", str(out)],
                            cwd=str(tmp_path), capture_output=True, text=True)
    assert replot.returncode == 0 and "where the time goes" in replot.stdout, replot.stderr[-2000:]


@pytest.mark.skipif(not os.environ.get("SMCA_OFFICIAL_REPO"), reason="set SMCA_OFFICIAL_REPO to a checkout of SMCA-DETR")
def test_speed_benchmark_against_official(speed, tmp_path):
    out = tmp_path / "speed.json"
    cmd = [
        sys.executable, os.path.join(REPO, "benchmarks", "speed.py"), "--official-repo",
        os.environ["SMCA_OFFICIAL_REPO"], "--sizes", "128x160", "--train-size", "128x160",
        "--models", "smca_single_scale", "--skip", "scaling", "--warmup", "0", "--repeats", "1",
        "--output", str(out),
    ]
    run = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert all(d["pass"] for d in r["single_scale"]["equal_outputs"].values())
    assert r["single_scale"]["train"][0]["loss_equal"]
    assert "official_same_malloc" in r["single_scale"]["train"][0]
    assert speed.speedup_limit(r)["limit"] > 1
