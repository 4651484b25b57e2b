"""`kidney-edge benchmark`: record fields, statistics, and agreement with a plain onnxruntime loop."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _factories import CONV_SIZE, make_conv_onnx
from test_runtime import run_cli_without_torch, write_gray_images

from kidney_edge.errors import InputError
from kidney_edge.spec import ModelSpec


def plain_ort_median_ms(model: Path, batch_size: int, threads: int, iterations: int = 30) -> float:
    """The reference: onnxruntime timed directly, no kidney-edge code in the loop."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(1).normal(size=(batch_size, 3, CONV_SIZE, CONV_SIZE)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"input": batch})
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        session.run(None, {"input": batch})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def test_benchmark_json_fields_and_figures_agree_with_plain_onnxruntime(tmp_path: Path) -> None:
    model = make_conv_onnx(tmp_path / "export" / "run" / "model.onnx", int8_sibling=True)
    images = tmp_path / "images"
    write_gray_images(images, 12)
    out = tmp_path / "bench.json"
    args = ["benchmark", "--model", str(model), "--batch-sizes", "1,4", "--threads", "1"]
    process = run_cli_without_torch(
        *args, "--images", str(images), "--iterations", "20", "--json", str(out), cwd=tmp_path
    )
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "ORT int8" in output and "images/s" in output

    record = json.loads(out.read_text())
    machine = record["machine"]
    assert machine["cores_usable"] >= 1 and machine["onnxruntime"] and machine["python"]
    assert machine["cpu_model"] and {"avx2", "avx512f", "avx512_vnni", "avx_vnni"} <= set(
        machine["isa_flags"]
    )
    rows = {(r["precision"], r["batch_size"], r["threads"], r["workers"]): r for r in record["model_only"]}
    layouts = {(1, 1)}  # --threads 1: one batch at a time on one thread (predict's layout is not added)
    assert set(rows) == {(p, b, *layout) for p in ("fp32", "int8") for b in (1, 4) for layout in layouts}
    for (_, batch_size, _, workers), row in rows.items():
        latency, per_image = row["latency_ms"], row["per_image_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] and latency["mean"] > 0
        assert per_image["p50"] == pytest.approx(latency["p50"] / batch_size, rel=1e-3)
        if workers == 1:  # one batch at a time: throughput is the inverse of the mean latency
            assert row["images_per_s"] == pytest.approx(1000 * batch_size / latency["mean"], rel=0.02)
        else:  # side by side: more images/s than one call's latency allows, at most `workers` x
            per_call = 1000 * batch_size / latency["mean"]
            assert 0.9 * per_call < row["images_per_s"] <= workers * per_call * 1.05
        assert row["iterations"] == 20
    pipeline = record["pipeline"]
    assert pipeline["images"] == 12 and pipeline["failed"] == 0 and pipeline["images_per_s"] > 0
    assert record["pytorch"] is None
    assert {(s["batch_size"], s["threads"], s["workers"]) for s in record["int8_speedup"]} == {
        (b, *layout) for b in (1, 4) for layout in layouts
    }

    reference = plain_ort_median_ms(model, batch_size=4, threads=1)
    measured = rows[("fp32", 4, 1, 1)]["latency_ms"]["p50"]
    assert 0.5 < measured / reference < 2.0, (measured, reference)  # shared, noisy machines


def test_without_threads_predicts_layout_is_measured_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kidney_edge.runtime import benchmark, predict, run_benchmark

    for module in (benchmark, predict):
        monkeypatch.setattr(module, "available_cpus", lambda: 2)
    model = make_conv_onnx(tmp_path / "export" / "run" / "model.onnx")
    images = tmp_path / "images"
    write_gray_images(images, 6)
    record = run_benchmark(model, batch_sizes=(2,), warmup=1, iterations=6, images_dir=images)
    layouts = [(r["threads"], r["workers"]) for r in record["model_only"]]
    assert layouts == [(2, 1), (1, 2)]  # all cores on one batch, then predict's 2 workers x 1 thread
    assert record["model_only"][1]["iterations"] == 6  # the calls are shared, not repeated per worker
    assert (record["pipeline"]["workers"], record["pipeline"]["threads"]) == (2, 1)


def test_execution_layout_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    from kidney_edge.runtime import ExecutionLayout, execution_layout, predict

    monkeypatch.setattr(predict, "available_cpus", lambda: 2)
    assert execution_layout() == ExecutionLayout(workers=2, threads=1)
    assert execution_layout(threads=2) == ExecutionLayout(workers=1, threads=2)
    assert execution_layout(workers=1) == ExecutionLayout(workers=1, threads=2)
    assert execution_layout(threads=3, workers=3) == ExecutionLayout(workers=3, threads=3)
    monkeypatch.setattr(predict, "available_cpus", lambda: 32)
    assert execution_layout() == ExecutionLayout(
        workers=predict.MAX_WORKERS, threads=32 // predict.MAX_WORKERS
    )
    monkeypatch.setattr(predict, "available_cpus", lambda: 1)
    assert execution_layout() == ExecutionLayout(workers=1, threads=1)
    for bad, flag in (
        ({"workers": 0}, "--workers"),
        ({"workers": 65}, "--workers"),
        ({"threads": 0}, "--threads"),
    ):
        with pytest.raises(InputError, match=flag):
            execution_layout(**bad)


def test_latency_stats_on_known_times() -> None:
    from kidney_edge.runtime import latency_stats

    stats = latency_stats([0.001, 0.002, 0.003, 0.004], batch_size=2)
    assert stats["latency_ms"]["p50"] == pytest.approx(2.5)
    assert stats["latency_ms"]["mean"] == pytest.approx(2.5)
    assert stats["latency_ms"]["p99"] == pytest.approx(3.97)
    assert stats["per_image_ms"]["p50"] == pytest.approx(1.25)
    assert stats["images_per_s"] == pytest.approx(800.0)


def test_model_variants_pairs_fp32_and_int8(tmp_path: Path) -> None:
    from kidney_edge.runtime import INT8_FILE, model_variants

    fp32 = tmp_path / "model.onnx"
    fp32.write_bytes(b"x")
    assert model_variants(fp32) == {"fp32": fp32}
    int8 = tmp_path / "model.int8.onnx"
    int8.write_bytes(b"x")
    assert model_variants(fp32) == model_variants(int8) == {"fp32": fp32, "int8": int8}
    other = make_conv_onnx(tmp_path / "lite0.onnx")
    assert model_variants(other) == {"fp32": other}
    quantized = make_conv_onnx(tmp_path / "quantized" / "lite0.onnx", int8_sibling=True).with_name(INT8_FILE)
    renamed = quantized.rename(quantized.with_name("lite0_q.onnx"))  # INT8 by its graph, not its name
    assert model_variants(renamed) == {"int8": renamed}


def test_pytorch_branch_is_skipped_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kidney_edge.runtime.benchmark import BenchmarkConfig
    from kidney_edge.torch_bench import bench_pytorch

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"x")
    result = bench_pytorch(checkpoint, BenchmarkConfig(threads=(1,)), report=lambda message: None)
    assert result["rows"] == [] and "not installed" in result["skipped"]


def test_pytorch_eager_rows_when_torch_and_a_checkpoint_are_there(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from kidney_edge.backbones import create_model
    from kidney_edge.checkpoint import save_checkpoint
    from kidney_edge.runtime.benchmark import BenchmarkConfig
    from kidney_edge.torch_bench import bench_pytorch

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=4, pretrained=False)
    save_checkpoint(tmp_path / "best.pt", model=model, spec=ModelSpec(input_size=32), config={})
    config = BenchmarkConfig(batch_sizes=(2,), threads=(1,), warmup=1, iterations=3)
    result = bench_pytorch(tmp_path / "best.pt", config, report=lambda message: None)
    assert result["skipped"] is None and result["input_size"] == 32
    (row,) = result["rows"]
    assert row["engine"] == "pytorch-eager" and row["batch_size"] == 2 and row["iterations"] == 3
    assert row["latency_ms"]["p50"] > 0 and row["images_per_s"] > 0


def test_int8_speedup_pairs_rows() -> None:
    from kidney_edge.runtime.benchmark import int8_speedup

    def row(precision: str, batch_size: int, images_per_s: float, workers: int = 1) -> dict:
        return {"precision": precision, "batch_size": batch_size, "threads": 2, "workers": workers,
                "images_per_s": images_per_s}  # fmt: skip

    rows = [
        row("fp32", 1, 250.0),
        row("int8", 1, 500.0),
        row("fp32", 8, 30.0),
        row("int8", 8, 90.0, workers=2),
    ]
    assert int8_speedup(rows) == [{"batch_size": 1, "threads": 2, "workers": 1, "speedup": 2.0}]


def test_options_are_validated_with_flag_names(tmp_path: Path) -> None:
    from kidney_edge.runtime import BenchmarkConfig, available_cpus, parse_int_list

    assert parse_int_list("1, 8", "--batch-sizes") == (1, 8)
    with pytest.raises(InputError, match="--threads"):
        parse_int_list("two", "--threads")
    with pytest.raises(InputError, match="--batch-sizes"):
        BenchmarkConfig(batch_sizes=(0,))
    with pytest.raises(InputError, match="--images"):
        BenchmarkConfig(images_dir=tmp_path / "missing")
    assert BenchmarkConfig().thread_counts == (available_cpus(),) and BenchmarkConfig(
        threads=(3,)
    ).thread_counts == (3,)


# --------------------------------------------------------------------------- benchmarks/_harness.py

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch):
    """benchmarks/_harness.py, imported the way the scripts import it (benchmarks/ on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _harness

    return _harness


def test_record_has_command_commit_utc_time_machine_and_load(harness) -> None:
    from datetime import datetime, timedelta, timezone

    record = harness.start_record(model="m.onnx")
    assert record["model"] == "m.onnx" and record["command"].startswith("python ")
    assert record["commit"] == "unknown" or len(record["commit"]) >= 7
    started = datetime.fromisoformat(record["started_utc"])
    assert started.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - started) < timedelta(minutes=1)
    machine = record["machine"]
    assert machine["cpu_model"] and machine["cores_usable"] >= 1 and "avx2" in machine["isa_flags"]
    assert "load_average_1m_5m_15m" not in machine  # load has one key naming: before / after
    assert len(record["load_average_before"]) == 3
    harness.finish_record(record)
    assert len(record["load_average_after"]) == 3 and record["finished_utc"] >= record["started_utc"]
    json.dumps(record)  # plain JSON


def test_older_records_are_read_under_their_own_key_names(harness) -> None:
    new = {"load_average_before": [1.0, 2.0, 3.0], "started_utc": "2026-12-01T00:00:00+00:00"}
    assert harness.recorded_load(new, "before") == [1.0, 2.0, 3.0]
    assert harness.recorded({"uptime_load_start": [4.0, 4.0, 4.0]}, "load_average_before") == [4.0, 4.0, 4.0]
    assert harness.recorded_load({"load_after": [5.0, 5.0, 5.0]}, "after") == [5.0, 5.0, 5.0]
    snapshots = {"machine_before": {"load_average_1m_5m_15m": [6.0, 6.0, 6.0]},
                 "machine_after": {"load_average_1m_5m_15m": [7.0, 7.0, 7.0]}}  # fmt: skip
    assert harness.recorded_load(snapshots, "before") == [6.0, 6.0, 6.0]
    assert harness.recorded_load(snapshots, "after") == [7.0, 7.0, 7.0]
    assert harness.recorded({"first_batch_s": 0.5}, "first_row_s") == 0.5
    assert harness.recorded({}, "first_row_s", "-") == "-"


def test_results_are_written_atomically(harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kidney_edge.io_utils

    out = tmp_path / "results" / "thing"
    harness.write_results(out, {"figure": 1.5}, "# thing\n")
    assert harness.read_results(out) == {"figure": 1.5}
    assert out.with_suffix(".md").read_text() == "# thing\n"

    def interrupted(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(kidney_edge.io_utils.os, "fsync", interrupted)
    with pytest.raises(OSError, match="disk full"):
        harness.write_results(out, {"figure": 2.5}, "# changed\n")
    assert harness.read_results(out) == {"figure": 1.5}  # the old file, whole
    assert out.with_suffix(".md").read_text() == "# thing\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["thing.json", "thing.md"]  # no temp file left
    assert harness.read_results(tmp_path / "missing") is None


def test_proc_status_parsing_reads_vmhwm_in_kilobytes(harness) -> None:
    status = "Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\nRssAnon:\t   80000 kB\n"
    assert harness.parse_status_kb(status) == {"VmHWM": 123456, "RssAnon": 80000}
    assert harness.parse_status_kb(status, keys=("VmRSS",)) == {"VmRSS": 100000}
    assert harness.parse_status_kb("VmHWM:\n") == {}


def test_run_cli_times_predict_with_its_own_peak_rss_and_first_row(harness, tmp_path: Path) -> None:
    model = make_conv_onnx(tmp_path / "export" / "model.onnx")
    images = tmp_path / "images"
    write_gray_images(images, 10)
    out = tmp_path / "p.csv"
    ballast = b"x" * (300 << 20)  # resident in this process: it must not count as the child's
    run = harness.run_cli(["predict", images, "--model", model, "--out", out, "--batch-size", "2"], out=out)
    del ballast
    assert run.exit_code == 0, run.output
    assert run.rows == 10 and run.images_per_s == pytest.approx(10 / run.wall_s, rel=0.01)
    assert run.first_row_s is not None and 0 < run.first_row_s <= run.wall_s
    assert run.samples[-1][1] == 10
    assert 20 < run.peak_rss_mb < 300, run.peak_rss_mb  # VmHWM of predict's process alone
    # the child's own CPU time: start-up alone takes some, and N cores give at most N x wall
    assert 0.05 < run.cpu_s <= (os.cpu_count() or 1) * run.wall_s
    assert run.images_per_cpu_s == pytest.approx(10 / run.cpu_s, rel=0.01)
    record = run.to_dict()
    assert record["command"].startswith("kidney-edge predict") and record["output_tail"] == ""
    assert len(record["load_average_before"]) == 3 and "samples" not in record


def test_model_only_is_benchmarks_rows_and_the_two_denominators(harness, tmp_path: Path) -> None:
    model = make_conv_onnx(tmp_path / "model.onnx")
    measured = harness.model_only(
        model, precision="fp32", batch_sizes=(2,), threads=1, iterations=4, warmup=1
    )
    (row,) = measured["rows"]
    assert (row["batch_size"], row["threads"], row["workers"], row["iterations"]) == (2, 1, 1, 4)
    assert "--precision fp32" in measured["command"] and "OUT.json" in measured["command"]

    def row_of(batch_size: int, workers: int, images_per_s: float) -> dict:
        return {
            "batch_size": batch_size,
            "workers": workers,
            "threads": 2 // workers,
            "images_per_s": images_per_s,
        }

    rows = {"rows": [row_of(1, 1, 100.0), row_of(8, 1, 150.0), row_of(8, 2, 180.0), row_of(16, 1, 160.0)]}
    assert harness.one_batch_images_per_s(rows, batch_size=8) == 150.0
    assert harness.best_images_per_s(rows, batch_size=8) == 180.0  # predict's side-by-side layout
    assert harness.one_batch_images_per_s(rows) == 160.0  # the best batch size
    assert harness.best_images_per_s(rows) == 180.0
    with pytest.raises(ValueError, match="batch size 4"):
        harness.one_batch_images_per_s(rows, batch_size=4)


# Patterns of the facts the harness owns, in a script that should import them instead.
_OWNED_BY_HARNESS = {
    "load average": r"os\.getloadavg\(",
    "git commit": r"rev-parse|def git_commit",
    "machine info": r"machine_info\(|cpu_info\(|platform\.(processor|python_version|machine)\(|def machine\(",
    "the CPU-kind label": r"def cpu_kind\(",
    "another script as a library": r"^\s*(from|import) bench_",
    "a non-atomic result file": r"\.write_text\(|json\.dump\(",
    "a phantom family's folder name": r"-d\{[^}]*\}-n\{",
}
# Another engineer ports bench_recipe.py to the harness.
_NOT_YET_ON_THE_HARNESS: set[str] = set()


def harness_violations(source: str) -> list[str]:
    """The harness-owned facts a benchmark script computes itself."""
    import re

    return [fact for fact, pattern in _OWNED_BY_HARNESS.items() if re.search(pattern, source, re.M)]


def test_scripts_take_machine_load_commit_and_files_from_the_harness() -> None:
    scripts = sorted(BENCHMARKS.glob("bench_*.py"))
    assert len(scripts) >= 10
    found = {
        script.name: harness_violations(script.read_text())
        for script in scripts
        if script.name not in _NOT_YET_ON_THE_HARNESS
    }
    assert {name: facts for name, facts in found.items() if facts} == {}
    for script in scripts:
        if script.name not in _NOT_YET_ON_THE_HARNESS:
            assert "import _harness as harness" in script.read_text(), script.name


def test_the_guard_sees_a_script_that_keeps_its_own_copy() -> None:
    planted = (BENCHMARKS / "bench_runtime.py").read_text() + (
        "\nfrom bench_serve import free_port\n"
        "def git_commit():\n    return subprocess.run(['git', 'rev-parse', 'HEAD'])\n"
        "LOAD = os.getloadavg()\nPath('x.md').write_text('half')\n"
        "data = workdir / f'{family}-d{seed}-n{n}-{size}px'\n"
    )
    assert harness_violations(planted) == [
        "load average",
        "git commit",
        "another script as a library",
        "a non-atomic result file",
        "a phantom family's folder name",
    ]


# Results whose Markdown is rendered from their JSON alone (the others add hand-written notes).
_RENDERED_FROM_JSON = ("runtime", "int8", "ray", "serve", "series", "ood", "holdout")


@pytest.mark.parametrize("name", _RENDERED_FROM_JSON)
def test_recorded_results_re_render_unchanged(name: str, tmp_path: Path) -> None:
    """A renderer change must not change a recorded figure: each script's --render-only path
    on its recorded JSON writes the committed Markdown again."""
    import shutil
    import subprocess

    results = BENCHMARKS / "results"
    for suffix in (".json", ".md"):  # int8.md: its legacy section is kept from the Markdown
        shutil.copy(results / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"bench_{name}.py"), "--render-only", "--out", str(tmp_path / name)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / f"{name}.md").read_text() == (results / f"{name}.md").read_text()
    assert (tmp_path / f"{name}.json").read_bytes() == (results / f"{name}.json").read_bytes()


def test_data_results_re_render_unchanged(tmp_path: Path) -> None:
    import shutil
    import subprocess

    results = BENCHMARKS / "results"
    shutil.copy(results / "data.json", tmp_path / "data.json")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_data.py"), "--render-only", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "data.md").read_text() == (results / "data.md").read_text()


@pytest.fixture
def bench_recipe(monkeypatch: pytest.MonkeyPatch):
    """benchmarks/bench_recipe.py, imported the way the harness fixture imports _harness."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_recipe

    return bench_recipe


def test_recipe_bench_default_is_the_librarys_finetune_default(bench_recipe) -> None:
    """The worst-case table is 'the defaults at full size': the recipe it reads must be the
    fine-tuning phase `kidney-edge train` runs without options."""
    from kidney_edge.training.config import TrainConfig, default_finetune_phase

    recipe, phase = bench_recipe.RECIPES[bench_recipe.DEFAULT_RECIPE], default_finetune_phase()
    assert (recipe.lr, recipe.unfreeze_blocks, recipe.epochs, recipe.patience, recipe.layer_decay) == (
        phase.lr, phase.unfreeze_blocks, phase.epochs, phase.patience, phase.layer_decay)  # fmt: skip
    assert bench_recipe.WORST_CASE_RECIPES[0][0] == bench_recipe.DEFAULT_RECIPE
    library = TrainConfig(data_dir=Path("d"), out_dir=Path("o"))
    assert (recipe.region, recipe.arch, recipe.image_size) == (library.region, library.arch, library.image_size)


def test_worst_case_table_keeps_full_size_default_runs_worst_first(bench_recipe) -> None:
    def run(family: str, f1: float, recipe: str = bench_recipe.DEFAULT_RECIPE, n: int = 800) -> dict:
        test = {"macro_f1": f1, "macro_f1_ci": [f1 - 0.1, f1 + 0.1], "tumor_recall": 0.5,
                "recall": {"Tumor": 0.5, "Stone": 0.25, "Cyst": 1.0, "Normal": 0.75}}  # fmt: skip
        result = {"test": {"argmax": test}, "n_train": 560, "wall_s": 300.0, "load_before": [1.0],
                  "load_after": [2.0], "warnings": ["x retried from the best model at 0.0001"]}  # fmt: skip
        return {"family": family, "seed": 0, "data_seed": 11, "recipe": recipe, "n_images": n,
                "image_size": bench_recipe.RECIPES[recipe].image_size or 224, "result": result}  # fmt: skip

    assert bench_recipe.RECIPES[bench_recipe.DEFAULT_RECIPE].image_size == 448  # read at its own size only:
    other_size = {**run("lookalike", 0.05), "image_size": 224}  # not a row of its table
    runs = [run("dicom-series", 0.54), run("lookalike", 0.21), run("lookalike-oracle", 0.6), run("lookalike-d0.25", 0.8),
            run("lookalike", 0.3, recipe="lr3e-4-b9-e12"), run("classic", 0.9, n=500), other_size]  # fmt: skip
    rows = [line for line in bench_recipe.render_worst_case(runs, ["a note"]) if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| lookalike", "| dicom-series"]
    assert "| 0.210 [0.110, 0.310] | 0.50 | 0.50 / 0.25 / 1.00 / 0.75 | 1 | 5.0 | 1.0 -> 2.0 |" in rows[1]
    # Each recipe the defaults were chosen against gets its own table, each with its worst case,
    # and the shortfall table compares them on the datasets they all ran.
    (default, what), *_, (whole_recipe, whole_what) = bench_recipe.WORST_CASE_RECIPES
    whole = [run("lookalike", 0.19, recipe=whole_recipe), run("dicom-series", 0.64, recipe=whole_recipe)]
    text = "\n".join(bench_recipe.render_worst_case([*runs, *whole], []))
    assert text.index(f"`{default}` ({what})") < text.index(f"`{whole_recipe}` ({whole_what})")
    assert f"`{default}` ({what}); worst test macro-F1 across its datasets: 0.210" in text
    assert f"`{whole_recipe}` ({whole_what}); worst test macro-F1 across its datasets: 0.190" in text
    assert f"| `{default}` | 0.210 | 0.100 (dicom-series, data seed 11, 800 slices) |" in text
    assert f"| `{whole_recipe}` | 0.190 | 0.020 (lookalike, data seed 11, 800 slices) |" in text
