"""The benchmark tool (``python -m smoothce.bench``): options, presets, the interleaved rounds,
the limits, the memory measurement, the files it writes, the fused linear loss's sweep, the
vocabulary-parallel launcher, the loss's options (soft-capping, z-loss, class weights) in every
implementation, and the package's shape. Sizes are tiny so this file stays fast."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, LINUX_RSS

from smoothce import bench
from smoothce.bench import cli, impls, machine, measure, report, runner, vocab_parallel
from smoothce.bench.cases import VOCAB_SIZES, Case, class_weights, grid, make_inputs, reference_loss
from smoothce.bench.impls import IMPLEMENTATIONS, Implementation
from smoothce.bench.measure import Limit, Timer, time_rounds

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


class _Captured(Exception):
    pass


def _settings_from_cli(monkeypatch, tmp_path, *argv) -> runner.Settings:
    """The settings ``python -m smoothce.bench *argv --device cpu`` would run with (nothing is measured)."""

    def capture(settings, checkpoint=None):
        raise _Captured(settings)

    monkeypatch.setattr(runner, "run", capture)
    with pytest.raises(_Captured) as caught:
        cli.main([*argv, "--device", "cpu", "--out", str(tmp_path)])
    return caught.value.args[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2048x32000", (2048, 32000)), (" 7X50257 ", (7, 50257))],  # spaces and an upper-case X are accepted
)
def test_shape(text, expected, monkeypatch, tmp_path):
    settings = _settings_from_cli(monkeypatch, tmp_path, "--shapes", text, "--dtypes", "fp32", "--modes", "fwd")
    assert [(case.n, case.v) for case in settings.cases] == [expected]


@pytest.mark.parametrize("text", ["2048", "12x", "x32000", "2048x32000x2", "0x10", "ax3", "2048by3"])
def test_shape_rejects_and_names_the_bad_item(text, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--shapes", text, "--device", "cpu", "--out", "unused"])
    assert stopped.value.code == 2
    assert f"invalid NxV shape value: '{text}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mode", "dtype", "factor"),
    [("fwd", "fp32", 4), ("fwd+bwd", "fp32", 8), ("fwd", "bf16", 2), ("fwd+bwd", "bf16", 4)],
)
def test_bytes_moved_is_logits_read_plus_gradient_written(mode, dtype, factor):
    # 3 x 1001: an odd size, so a model that rounds or pads would show.
    assert Case(3, 1001, dtype, mode).bytes_moved == factor * 3 * 1001


class _FakeStep:
    """Sleeps ``seconds`` per run; counts prepares and runs; ``fail_at`` makes its n-th run raise."""

    def __init__(self, name="a", seconds=0.0, fail_at=None):
        self.name, self.seconds, self.fail_at = name, seconds, fail_at
        self.runs = self.prepares = 0

    def prepare(self):
        self.prepares += 1

    def release(self):
        pass

    def run(self):
        self.runs += 1
        if self.runs == self.fail_at:
            raise RuntimeError(f"{self.name} broke")
        time.sleep(self.seconds)


def test_rounds_interleave_and_rotate_the_order():
    steps = {name: _FakeStep(name) for name in "abc"}
    times, errors, order = time_rounds(steps, lambda step: ord(step.name) / 1000, rounds=4)
    assert errors == {}
    # Every round measures every implementation once, starting one further along.
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert times == {name: [ord(name) / 1000] * 4 for name in "abc"}


def test_rounds_drop_a_failing_implementation_and_keep_the_others():
    steps = {"ok": _FakeStep("ok"), "bad": _FakeStep("bad", fail_at=2)}  # fails in round 2

    def measure(step):
        step.run()
        return 1.0

    times, errors, _ = time_rounds(steps, measure, rounds=3)
    assert errors == {"bad": "RuntimeError: bad broke"}
    assert times == {"ok": [1.0, 1.0, 1.0]}


def test_cpu_timer_gives_one_runs_time_after_an_untimed_warm_up():
    step = _FakeStep(seconds=0.004)
    seconds = Timer(torch.device("cpu"), rep_ms=30).measure(step)
    assert 0.004 <= seconds < 0.02  # one run's time, not the round's
    assert step.runs >= 2  # torch.utils.benchmark's untimed warm-up, then runs for 30 ms
    assert step.prepares == 1  # once per round, untimed; Step.run drops its previous gradient itself


def test_fwd_bwd_step_drops_its_previous_gradient_so_runs_back_to_back_do_not_accumulate():
    logits, target = make_inputs(4, 10, "fp32", torch.device("cpu"), seed=1)
    step = impls.Step(IMPLEMENTATIONS["torch-eager"], logits, target, "fwd+bwd", 0.1)
    step.run()
    first = step.logits.grad.clone()
    step.run()
    assert torch.equal(step.logits.grad, first)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_limits_copy_and_read_the_logits(dtype):
    logits, _ = make_inputs(5, 33, dtype, torch.device("cpu"), seed=1)
    copy = Limit(logits, "copy")
    copy.run()
    assert torch.equal(copy.out, logits)
    assert Limit(logits, "read").run() == logits.max()
    with pytest.raises(ValueError, match="'write'"):
        Limit(logits, "write")


@pytest.mark.skipif(not LINUX_RSS, reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_rss_growth_measures_what_a_run_allocates():
    size = 48 << 20

    def allocate():
        block = torch.ones(size // 4)  # filled, so resident
        del block

    assert 0.95 * size <= measure.rss_growth(allocate) <= 1.25 * size
    assert measure.rss_growth(lambda: None) < 4 << 20  # a run that allocates nothing


@pytest.mark.skipif(not LINUX_RSS, reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_peak_memory_counts_the_gradient_and_not_the_logits_nor_memory_freed_before():
    # 1024 x 8192 fp32 = 32 MiB of logits. fwd+bwd must return a 32 MiB gradient, so any
    # correct measurement shows at least that; a no-grad smoothce forward keeps only
    # per-row results and block scratch (a few MiB), so the logits must not be counted.
    n, v = 1024, 8192
    logits_bytes = n * v * 4
    logits, target = make_inputs(n, v, "fp32", torch.device("cpu"), seed=0)

    def peak(impl, mode):
        step = impls.Step(IMPLEMENTATIONS[impl], logits, target, mode, 0.1)
        step.run()  # warm-up; then buffers of the logits' size allocated and freed, which malloc could hand back
        scratch = [torch.ones(n, v) for _ in range(3)]
        del scratch
        return measure.peak_extra(step, torch.device("cpu"))

    # torch-eager keeps the log-probabilities and their gradient besides the returned gradient: about 3x.
    assert 2.5 * logits_bytes <= peak("torch-eager", "fwd+bwd") <= 3.5 * logits_bytes
    assert 0.95 * logits_bytes <= peak("smoothce", "fwd+bwd") <= 1.3 * logits_bytes
    assert peak("smoothce", "fwd") < 0.5 * logits_bytes


def test_cli_writes_tables_json_and_plots_with_ratios_from_one_run(tmp_path):
    out = tmp_path / "results"
    threads_before = torch.get_num_threads()
    # 256 x 3001: odd V (no power-of-two fast path); bf16 because it upcasts on the way; the
    # gradient (1.5 MiB) is well above the page-granular resident-set measurement.
    code = cli.main(
        [
            "--shapes",
            "256x3001",
            "--dtypes",
            "bf16",
            "--impls",
            "smoothce,torch-eager",
            "--rounds",
            "3",
            "--rep-ms",
            "5",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert torch.get_num_threads() == threads_before  # --threads 1 applied to the run only
    record = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert record["environment"]["smoothce_backend"] == "cpu"
    assert record["environment"]["versions"]["torch"] == torch.__version__
    assert record["environment"]["collect_env"]["torch_version"] == torch.__version__
    assert [(c["mode"], c["dtype"]) for c in record["cases"]] == [("fwd+bwd", "bf16"), ("fwd", "bf16")]
    for case in record["cases"]:
        results = case["results"]
        # Same run: both measured in every round, interleaved, and the limit beside them.
        assert len(results["smoothce"]["times_s"]) == len(results["torch-eager"]["times_s"]) == 3
        assert sorted(case["run_order"][:2]) == ["smoothce", "torch-eager"]
        assert case["limit"]["kind"] == ("copy" if case["mode"] == "fwd+bwd" else "read")
        assert all(entry["loss_ok"] for entry in results.values())
        speedup = results["torch-eager"]["median_s"] / results["smoothce"]["median_s"]
        assert case["ratios"]["torch-eager"]["speedup"] == pytest.approx(speedup)
        assert f"{speedup:#.3g}×".replace(".×", "×") in md
        for entry in results.values():
            assert entry["of_limit"] == pytest.approx(case["limit"]["median_s"] / entry["median_s"])
            if case["mode"] == "fwd+bwd":  # the gradient is counted, whatever else the run needs
                assert entry["peak_extra_bytes"] >= 0.95 * case["logits_bytes"], entry
    assert "| N × V | copy limit | smoothce | torch-eager | speed-up vs torch-eager |" in md
    assert "Peak memory beyond the logits" in md
    for name in ("fwd_bwd-bf16.png", "fwd-bf16.png"):
        if HAVE_MATPLOTLIB:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in md
        else:  # the optional extra is missing: no plots, and the tables do not point at any
            assert not (out / name).exists()
            assert f"]({name})" not in md
    assert "speed-up vs torch-eager" in (out / "summary.md").read_text()


def test_gpu_targets_preset_is_exactly_the_issue_targets():
    cases = cli.gpu_target_cases()
    smoothed = [c for c in cases if c.label_smoothing == 0.1]
    assert len(cases) == len(set(cases))
    shapes = {(8192, 32000), (8192, 128256), (4096, 262144), (16384, 151936), cli.HOST_SHAPE}
    shapes |= {(1024, v) for v in VOCAB_SIZES}
    assert set(smoothed) == set(grid(shapes, ["bf16", "fp32"], ["fwd+bwd", "fwd"]))
    assert all(c.impls is None for c in smoothed)  # every implementation, torch.compile included
    unsmoothed = [c for c in cases if c.label_smoothing == 0.0]  # where quack can run
    assert {(c.n, c.v, c.dtype, c.mode) for c in unsmoothed} == {
        (n, v, d, "fwd+bwd") for n, v in cli.TARGET_SHAPES for d in ("bf16", "fp32")
    }
    assert all("quack" in c.impls and "torch-compile" not in c.impls for c in unsmoothed)
    # Grouped by V, so torch.compile's per-V compilation is reset only when V changes.
    vocab = [c.v for c in cases]
    assert vocab == sorted(vocab, key=vocab.index)


def test_gpu_targets_preset_runs_tiny_on_cpu(tmp_path, capsys):
    code = cli.main(
        [
            "--preset",
            "gpu-targets",
            "--tiny",
            "--device",
            "cpu",
            "--impls",
            "smoothce,torch-eager",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--no-memory",
            "--no-plots",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["settings"]["ignore_every"] == 10
    assert record["settings"]["time_limit_s"] == 165.0
    assert len(record["cases"]) == len(cli.gpu_target_cases())
    for case in record["cases"]:
        assert case["ignored_rows"] == case["n"] // 10
        assert set(case["results"]) == {"smoothce", "torch-eager"}
        assert all(entry["loss_ok"] for entry in case["results"].values()), case
    # One progress line per case, flushed as it goes.
    assert capsys.readouterr().err.count("] fwd") == len(record["cases"])


def test_time_limit_skips_the_cases_left_and_says_so(monkeypatch):
    def build(label_smoothing, ignore_index):  # the right loss, slowly: 0.3 s per call
        return lambda logits, target: (
            time.sleep(0.3) or torch.nn.functional.cross_entropy(logits, target, label_smoothing=label_smoothing)
        )

    monkeypatch.setitem(IMPLEMENTATIONS, "slow", Implementation("slow", "sleeps", build))
    settings = runner.Settings(
        device=torch.device("cpu"),
        cases=grid([(8, 100), (8, 200)], ["fp32"], ["fwd"]),
        impls=["slow"],
        rounds=1,
        rep_ms=0,
        memory=False,
        time_limit_s=0.2,
    )
    first, second = runner.run(settings)["cases"]
    assert first["results"]["slow"]["loss_ok"]  # started in time, so measured in full
    assert second["skipped"] == "skipped: time limit"


@pytest.mark.parametrize(
    ("ours_mib", "theirs_mib", "saving", "bound"),
    [
        (8.0, 24.0, 3.0, None),  # both measurable: the plain ratio
        (0.25, 24.0, 24.0, "lower"),  # ours under 1 MiB counts as 1 MiB: at least 24x
        (4.0, 0.0, 0.25, "upper"),  # theirs under 1 MiB: smoothce saves at most 0.25x
        (0.5, 0.5, None, None),  # both under the resolution: no ratio
    ],
)
def test_ratios_speedup_and_memory_saving(ours_mib, theirs_mib, saving, bound):
    mib = 1 << 20
    case = {
        "results": {
            "smoothce": {"median_s": 0.5, "peak_extra_bytes": int(ours_mib * mib)},
            "torch-eager": {"median_s": 2.0, "peak_extra_bytes": int(theirs_mib * mib)},
        }
    }
    ratio = report.ratios(case)["torch-eager"]
    assert ratio["speedup"] == 4.0
    assert ratio["memory_saving"] == saving
    assert ratio["memory_saving_bound"] == bound


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(6.42, "6.42 s"), (0.9996, "1.00 s"), (0.9994, "999 ms"), (0.0286, "28.6 ms"), (1.2e-5, "12.0 µs")],
)
def test_times_keep_three_digits_in_a_unit_that_fits(seconds, text):
    # 0.9996 s rounds up to the next unit instead of printing "1e+03 ms".
    assert report._time(seconds) == text


def test_loss_check_flags_an_implementation_that_computes_something_else(monkeypatch):
    # An implementation that forgets the label smoothing: it runs fine but must be marked.
    def build(label_smoothing, ignore_index):
        return lambda logits, target: torch.nn.functional.cross_entropy(logits, target)

    monkeypatch.setitem(IMPLEMENTATIONS, "no-smoothing", Implementation("no-smoothing", "wrong on purpose", build))
    settings = runner.Settings(
        device=torch.device("cpu"),
        cases=[Case(16, 1000, "fp32", "fwd")],
        impls=["smoothce", "no-smoothing"],
        rounds=2,
        rep_ms=0,
        memory=False,
    )
    results = runner.run(settings)["cases"][0]["results"]
    assert results["smoothce"]["loss_ok"] is True
    assert results["no-smoothing"]["loss_ok"] is False
    assert "⚠" in report.markdown(runner.run(settings), plots=[])


@pytest.mark.parametrize("ignore_every", [0, 3])
def test_reference_loss_matches_the_float64_formula_over_counted_rows(ignore_every):
    logits, target = make_inputs(7, 33, "fp32", torch.device("cpu"), seed=1, ignore_every=ignore_every)
    assert (target == -100).sum() == (7 // ignore_every if ignore_every else 0)
    z, keep = logits.double(), target != -100
    lam = 0.1
    safe = target.clamp_min(0)
    rows = torch.logsumexp(z, 1) - (1 - lam) * z.gather(1, safe[:, None])[:, 0] - lam / 33 * z.sum(1)
    assert reference_loss(logits, target, lam) == pytest.approx(float(rows[keep].mean()), rel=1e-12)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "12x"], "12x"),
        (["--dtypes", "fp8"], "fp8"),
        (["--modes", "bwd"], "bwd"),
        (["--impls", "smoothce,nope"], "nope"),
        (["--impls", "liger"], "liger"),  # exists, but only on GPUs
        (["--shapes", "8x8", "--tokens", "8"], "--shapes"),
        (["--preset", "gpu-targets", "--shapes", "8x8"], "--shapes"),
        (["--rounds", "0"], "'0'"),
        (["--label-smoothing", "1.5"], "1.5"),
        (["--device", "cuda:7"], "cuda:7"),  # a device this machine does not have (checked up to 7 GPUs)
        (["--device", "gpu0"], "gpu0"),  # not a torch device at all
    ],
)
def test_bad_options_stop_with_a_message_naming_them(argv, message, capsys):
    if "--device" not in argv:
        argv = [*argv, "--device", "cpu"]
    elif argv[1].startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as stopped:
        cli.main([*argv, "--out", "unused"])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.compile
def test_torch_compile_baseline_agrees_and_compiles_once_for_all_token_counts(monkeypatch):
    # One compilation (aot_eager: the graph is what is checked, Inductor's code is PyTorch's):
    # the forward at V = 1000, shared by two token counts because the rows are marked dynamic
    # (a per-shape recompile would show as 2 graphs).
    from torch._dynamo.utils import counters

    monkeypatch.setattr(impls, "COMPILE_BACKEND", "aot_eager")
    counters.clear()
    settings = runner.Settings(
        device=torch.device("cpu"),
        cases=grid([(8, 1000), (24, 1000)], ["fp32"], ["fwd"]),
        impls=["smoothce", "torch-compile"],
        rounds=1,
        rep_ms=0,
        memory=False,
    )
    record = runner.run(settings)
    for case in record["cases"]:
        assert case["results"]["torch-compile"]["loss_ok"] is True, case["results"]["torch-compile"]
    assert counters["stats"]["unique_graphs"] == 1


def _sum_of_ranks(rank, world, device):
    import torch.distributed as dist

    value = torch.tensor([float(rank)], device=device)
    dist.all_reduce(value)
    return value.item()


def _fail_on_rank_1(rank, world, device):
    if rank == 1:
        raise ValueError("rank one is broken on purpose")
    return rank


@pytest.mark.distributed
def test_launcher_joins_the_ranks_and_names_a_failing_one():
    assert vocab_parallel.launch(_sum_of_ranks, 2, timeout_s=120) == [1.0, 1.0]  # 0 + 1, seen by both ranks
    with pytest.raises(RuntimeError, match=r"rank 1 failed(.|\n)*rank one is broken on purpose"):
        vocab_parallel.launch(_fail_on_rank_1, 2, timeout_s=120)


@pytest.mark.distributed
def test_vocab_parallel_benchmark_counts_bytes_that_do_not_grow_with_v(tmp_path):
    out = tmp_path / "vp.md"
    text = vocab_parallel.main(
        [
            "--vocab",
            "64",
            "640",
            "--rows",
            "4",
            "--world",
            "2",
            "--repeat",
            "1",
            "--dtype",
            "float32",
            "--out",
            str(out),
        ]
    )
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| 64") or line.startswith("| 640")]
    assert len(rows) == 2
    assert rows[0][3] == rows[1][3]  # stats B/row: the same for a 10x larger vocabulary
    assert [int(r[5]) for r in rows] == [32 * 4, 320 * 4]  # gather B/row: the other rank's slice, fp32
    assert all(math.isfinite(float(r[7])) and math.isfinite(float(r[8])) for r in rows)  # both timed on rank 0
    assert out.read_text().strip() == text.strip()


@pytest.mark.skipif(DEVICE.type == "cpu", reason="needs SMOOTHCE_TEST_DEVICE=cuda or xpu (the GPU nox sessions)")
def test_accelerator_do_bench_timing_and_allocator_memory():
    # do_bench and the allocator-statistics memory path, on the GPU the session tests.
    # 512 x 32000: the gradient (62.5 MiB fp32) is far above any allocator slack.
    settings = runner.Settings(
        device=DEVICE,
        cases=grid([(512, 32000)], ["fp32"], ["fwd+bwd", "fwd"]),
        impls=["smoothce", "torch-eager"],
        rounds=2,
        rep_ms=20,
    )
    record = runner.run(settings)
    logits_bytes = 512 * 32000 * 4
    for case in record["cases"]:
        for name, entry in case["results"].items():
            assert "error" not in entry, (name, entry)
            assert "memory_error" not in entry, (name, entry)
            assert entry["loss_ok"], (name, entry)
            # Nothing moves the logits faster than a plain copy (or read) of them does.
            assert entry["of_limit"] < 1.2, (name, entry)
            if case["mode"] == "fwd+bwd":
                assert entry["peak_extra_bytes"] >= logits_bytes, (name, entry)
    assert record["environment"]["device_name"] == getattr(torch, DEVICE.type).get_device_name(DEVICE)


BENCH_DIR = Path(bench.__file__).parent


def _bench_imports(path: Path) -> set[str]:
    """The smoothce.bench modules ``path`` imports anywhere in it (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "smoothce.bench":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("smoothce.bench."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("smoothce.bench.")}
    return found - {"__main__"}


def test_bench_package_has_no_import_cycle_fits_its_line_budget_and_holds_no_main_job_check():
    graph = {path.stem: _bench_imports(path) for path in BENCH_DIR.glob("*.py")}
    state: dict[str, str] = {}

    def visit(module, chain):
        if state.get(module) == "open":
            raise AssertionError("import cycle: " + " -> ".join([*chain, module]))
        if state.get(module) is None:
            state[module] = "open"
            for other in graph.get(module, ()):
                visit(other, [*chain, module])
            state[module] = "done"

    for module in graph:
        visit(module, [])
    lines = sum(len(path.read_text().splitlines()) for path in BENCH_DIR.glob("*.py"))
    assert lines <= 1400, f"smoothce/bench/ has {lines} lines"  # ruff-formatted; issue 19's budget
    text = "".join(path.read_text() for path in BENCH_DIR.glob("*.py"))
    assert "linear_main_check" not in text  # the main job's checks live in smoothce.selfcheck
    assert "cross_entropy_reference" not in text


def test_linear_sweep_from_the_cli_has_pytorch_linear_cross_entropy_as_a_peer(tmp_path, capsys):
    code = cli.main(
        [
            "--op",
            "linear",
            "--device",
            "cpu",
            "--shapes",
            "64x8x300",
            "--dtypes",
            "fp32,bf16",
            "--reps",
            "1",
            "--no-compile",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "linear.json").read_text())
    assert [case["dtype"] for case in record["cases"]] == ["fp32", "bf16"]
    for case in record["cases"]:
        assert set(case["results"]) == {"matmuls", "smoothce", "torch-eager", "torch-linear-ce"}
        for name in ("smoothce", "torch-eager", "torch-linear-ce"):
            entry = case["results"][name]
            assert entry["d_weight"] < (1e-5 if case["dtype"] == "fp32" else 2e-2), (name, entry)
            assert entry["peak_extra_bytes"] is not None
            assert entry["ms"] > 0
    text = (tmp_path / "linear.md").read_text()
    assert "| 64x8x300 | bf16 | torch-linear-ce |" in text
    assert "not run: **torch-linear-ce-chunked**" in text  # λ = 0.1: PyTorch's chunked path cannot run
    assert "chunk budget: fp32 32 MiB, bf16 64 MiB;" in text  # each dtype's own default
    assert text.strip() in capsys.readouterr().out


def test_linear_sweep_at_zero_smoothing_runs_pytorchs_chunked_path(tmp_path):
    code = cli.main(
        [
            "--op",
            "linear",
            "--device",
            "cpu",
            "--shapes",
            "64x8x300",
            "--label-smoothing",
            "0",
            "--impls",
            "smoothce,torch-linear-ce-chunked",
            "--reps",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "linear.json").read_text())["cases"][0]["results"]
    assert results["torch-linear-ce-chunked"]["d_hidden"] < 1e-5, results


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "64x300"], "64x300"),
        (["--dtypes", "fp8"], "fp8"),
        (["--impls", "torch-linear-ce-chunked"], "label_smoothing=0"),
    ],
)
def test_linear_sweep_bad_options_name_them(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--op", "linear", "--device", "cpu", *argv, "--out", "unused"])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


# The loss's options (issue 16): --softcap, --z-loss and --class-weights reach every implementation, which all
# compute the same loss; an implementation without an option says "not supported".
OPTIONS_ARGV = ["--softcap", "30", "--z-loss", "1e-3", "--class-weights"]


def test_loss_options_from_the_cli_reach_every_case_and_name_the_results_folder(monkeypatch, tmp_path):
    settings = _settings_from_cli(monkeypatch, tmp_path, "--shapes", "8x100", "--dtypes", "fp32", *OPTIONS_ARGV)
    assert {(c.softcap, c.z_loss, c.class_weights) for c in settings.cases} == {(30.0, 1e-3, True)}
    assert settings.preset == "custom (softcap-30-z_loss-0.001-class-weights)"
    assert settings.impls == ["smoothce", "torch-eager", "torch-compile"]  # the ones that can run on CPU
    # Without --out: a folder of their own, beside the preset's results (nothing is written here).
    folder = cli.settings_from_args(*_parsed(["--quick", "--device", "cpu", "--z-loss", "1e-4"]))[1]
    assert folder.parts[-2:] == ("cpu", "quick-z_loss-0.0001")
    assert cli.settings_from_args(*_parsed(["--quick", "--device", "cpu"]))[1].parts[-2:] == ("cpu", "quick")


def _parsed(argv):
    parser = cli.build_parser()
    return parser.parse_args(argv), parser


@pytest.mark.parametrize(
    "argv", [["--softcap", "0"], ["--softcap", "-1"], ["--softcap", "inf"], ["--z-loss=-1e-4"], ["--z-loss", "nan"]]
)
def test_bad_loss_options_stop_with_a_message_naming_them(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main([*argv, "--device", "cpu", "--out", "unused"])
    assert stopped.value.code == 2
    assert f"'{argv[-1].split('=')[-1]}'" in capsys.readouterr().err


def _fake_module(monkeypatch, name: str, function: str, result):
    """A module ``name`` in sys.modules whose ``function`` records its keywords and returns ``result(logits)``."""
    calls = []
    module = type(sys)(name)
    setattr(module, function, lambda z, t, **kw: calls.append(kw) or result(z))
    monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_peers_get_the_options_under_their_own_names(monkeypatch):
    # Liger and flash-attn name the z-loss lse_square_scale; Liger takes softcap and weight too.
    z, t, w = torch.randn(4, 10), torch.tensor([1, -100, 3, 4]), torch.rand(10)
    liger = _fake_module(monkeypatch, "liger_kernel.transformers.functional", "liger_cross_entropy", lambda z: z.sum())
    IMPLEMENTATIONS["liger"].build(0.1, -100, softcap=30.0, z_loss=1e-3, weight=w)(z, t)
    assert liger == [
        {"label_smoothing": 0.1, "ignore_index": -100, "softcap": 30.0, "lse_square_scale": 1e-3, "weight": w}
        | {"reduction": "mean"}
    ]
    rows = lambda z: (torch.arange(4.0), torch.zeros(4))  # per-row losses and z-losses
    flash = _fake_module(monkeypatch, "flash_attn.ops.triton.cross_entropy", "cross_entropy_loss", rows)
    assert IMPLEMENTATIONS["flash-attn"].build(0.1, -100, z_loss=1e-3)(z, t) == 6.0 / 3  # mean over counted rows
    assert flash == [{"label_smoothing": 0.1, "ignore_index": -100, "lse_square_scale": 1e-3}]


@pytest.mark.parametrize(
    ("impl", "options", "why"),
    [
        ("liger", {"weight", "z_loss", "weighted z_loss"}, "weighted z_loss"),  # its z-loss is divided by the count
        ("liger", {"softcap", "z_loss", "weight"}, None),
        ("flash-attn", {"softcap", "z_loss"}, "softcap"),
        ("flash-attn", {"weight"}, "weight"),
        ("quack", {"softcap"}, "softcap"),
        ("quack", {"z_loss"}, "z_loss"),
    ],
)
def test_peers_without_an_option_say_not_supported(impl, options, why):
    peer = dataclasses.replace(IMPLEMENTATIONS[impl], module=None, device_types=None)  # as if installed, here
    reason = peer.unavailable_reason("cpu", sorted(options))
    assert reason is None if why is None else f"not supported: {why}" in reason


def _recording(impl: Implementation, seen: dict) -> Implementation:
    """``impl`` whose builder records the options it gets (by name: the value, or the weight's shape)."""

    def build(label_smoothing, ignore_index, **options):
        seen[impl.name] = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
        return impl.build(label_smoothing, ignore_index, **options)

    return dataclasses.replace(impl, build=build)


@pytest.mark.compile
@pytest.mark.parametrize(
    "options",
    [
        {"softcap": 30.0},  # alone each, and together
        {"z_loss": 1e-3},
        {"class_weights": True},
        {"softcap": 5.0, "z_loss": 1e-2, "class_weights": True},  # a small cap: most logits bent
    ],
)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_implementation_computes_the_same_loss_with_the_options(options, dtype, monkeypatch):
    # 16 x 50, every 3rd row ignored: each implementation against the float64 reference of smoothce.reference,
    # which the bench's own reference must match, and the options reach every builder.
    from smoothce.reference import cross_entropy_reference

    monkeypatch.setattr(impls, "COMPILE_BACKEND", "aot_eager")
    seen: dict[str, dict] = {}
    names = ["smoothce", "torch-eager", "torch-compile", "only-smoothing"]
    for name in names[:3]:
        monkeypatch.setitem(IMPLEMENTATIONS, name, _recording(IMPLEMENTATIONS[name], seen))
    plain = Implementation("only-smoothing", "no options", lambda lam, ii: lambda z, t: z.sum())
    monkeypatch.setitem(IMPLEMENTATIONS, "only-smoothing", plain)
    case = Case(16, 50, dtype, "fwd+bwd", 0.1, **options)
    settings = runner.Settings(torch.device("cpu"), [case], names, rounds=1, rep_ms=0, memory=False, ignore_every=3)
    full = runner.run(settings)
    record = full["cases"][0]
    logits, target = make_inputs(16, 50, dtype, torch.device("cpu"), seed=0, ignore_every=3)
    weight = class_weights(50, dtype, torch.device("cpu"), seed=0) if options.get("class_weights") else None
    assert weight is None or torch.equal(weight.float(), weight.bfloat16().float())  # the same in every dtype
    expected, _ = cross_entropy_reference(
        logits.double(),
        target,
        None if weight is None else weight.double(),
        label_smoothing=0.1,
        ignore_index=-100,
        reduction="mean",
        z_loss=options.get("z_loss", 0.0),
        softcap=options.get("softcap"),
    )
    assert record["reference_loss"] == pytest.approx(float(expected), rel=1e-12)
    want = {k: (50,) if k == "weight" else v for k, v in case.options(torch.ones(50)).items()}
    assert len(want) == len(options)
    for name in names[:3]:
        assert seen[name] == want, name
        entry = record["results"][name]
        assert entry["loss_ok"], (name, entry)
        assert entry["loss"] == pytest.approx(float(expected), rel=1e-5 if dtype == "fp32" else 2e-2), name
    assert set(record["results"]["only-smoothing"]) == {"not_supported"}  # not run, and so marked
    assert "not supported" in record["results"]["only-smoothing"]["not_supported"]
    markdown = report.markdown(full, plots=[])
    assert "| not supported |" in markdown
    assert report.options_text(record) in markdown


@pytest.mark.parametrize(("start", "end", "competed"), [(0.4, None, False), (2.5, None, True), (0.4, 3.1, True)])
def test_machine_text_says_other_work_competed_only_above_the_core_count(start, end, competed):
    env = machine.describe(torch.device("cpu"))
    env.update(logical_cores=2, load_average_at_start=start, load_average_at_end=end)
    text = machine.text(env)
    assert f"{start:.2f} at the start" in text
    assert ("other work competed" in text) is competed


@pytest.mark.compile
def test_loops_benchmark_runs_every_loop_with_the_eager_gradient(tmp_path):
    # benchmarks/loops.py, the training loops' timing for a GPU session, run tiny on CPU.
    path = Path(__file__).parents[1] / "benchmarks" / "loops.py"
    spec = importlib.util.spec_from_file_location("loops_benchmark", path)
    loops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loops)
    record = loops.main(["--out", str(tmp_path), "--device", "cpu", "--shapes", "40x300", "--rounds", "1"])
    assert [(case["shape"], case["dtype"]) for case in record["cases"]] == [([40, 300], "bf16"), ([40, 300], "fp32")]
    for case in record["cases"]:
        assert case["errors"] == {}
        names = {"eager", "eager-window", "eager-scaled", "compile", "compile-scaled", "torch-compile"}
        assert set(case["results"]) == names  # no CUDA graphs on a CPU
        for name, result in case["results"].items():
            # smoothce's loops give the eager gradient (a power-of-two scale divides out exactly)
            assert result["grad_error"] <= (0.0 if name != "torch-compile" else 1e-2), (name, result)
            assert result["ms"] > 0
            assert result["of_copy_limit"] > 0
    assert "| 40x300 | fp32 | compile-scaled |" in (tmp_path / "loops.md").read_text()
