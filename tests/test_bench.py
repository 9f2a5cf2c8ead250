"""The benchmark tool (``python -m smoothce.bench``): options, the interleaved timing loop,
the memory measurement, and the files it writes. Sizes are tiny so this file stays fast."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import DEVICE

from smoothce.bench import cli, memory, report, runner
from smoothce.bench.cases import Case, make_inputs, parse_shapes, reference_loss
from smoothce.bench.impls import IMPLEMENTATIONS, Implementation
from smoothce.bench.timing import Timer, time_interleaved

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
LINUX_RSS = sys.platform.startswith("linux") and memory.reset_peak_rss()


@pytest.mark.parametrize(
    ("text", "shapes"),
    [
        ("2048x32000,512x128256", [(2048, 32000), (512, 128256)]),  # the issue-2 targets
        (" 7X50257 ", [(7, 50257)]),  # spaces and an upper-case X are accepted
    ],
)
def test_parse_shapes(text, shapes):
    assert parse_shapes(text) == shapes


@pytest.mark.parametrize("text", ["2048", "12x", "x32000", "2048x32000x2", "0x10", "ax3", "2048by3"])
def test_parse_shapes_rejects_and_names_the_bad_item(text):
    with pytest.raises(ValueError, match="shape"):
        parse_shapes(text)


@pytest.mark.parametrize(
    ("mode", "dtype", "factor"),
    [("fwd", "fp32", 4), ("fwd+bwd", "fp32", 8), ("fwd", "bf16", 2), ("fwd+bwd", "bf16", 4)],
)
def test_bytes_moved_is_logits_read_plus_gradient_written(mode, dtype, factor):
    # 3 x 1001: an odd size, so a model that rounds or pads would show.
    assert Case(3, 1001, dtype, mode).bytes_moved == factor * 3 * 1001


class _FakeStep:
    """Records the order of runs; ``fail_at`` makes its n-th run raise."""

    def __init__(self, name, log, fail_at=None):
        self.name, self.log, self.fail_at, self.runs = name, log, fail_at, 0

    def prepare(self):
        pass

    def release(self):
        pass

    def run(self):
        self.runs += 1
        if self.runs == self.fail_at:
            raise RuntimeError(f"{self.name} broke")
        self.log.append(self.name)
        return torch.tensor(1.0)


def test_timing_interleaves_and_rotates_the_order():
    log = []
    steps = {name: _FakeStep(name, log) for name in ("a", "b", "c")}
    times, errors, order = time_interleaved(
        steps, Timer(torch.device("cpu")), warmup=2, reps=4, min_reps=4, budget_s=0.0
    )
    assert errors == {}
    assert log[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up: each implementation, in turn
    # Every repetition times every implementation once, starting one further along.
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_timing_drops_a_failing_implementation_and_keeps_the_others():
    log = []
    steps = {"ok": _FakeStep("ok", log), "bad": _FakeStep("bad", log, fail_at=3)}  # fails in rep 2
    times, errors, _ = time_interleaved(steps, Timer(torch.device("cpu")), warmup=1, reps=3, min_reps=3, budget_s=0)
    assert errors == {"bad": "RuntimeError: bad broke"}
    assert list(times) == ["ok"]
    assert len(times["ok"]) == 3


def test_timing_stops_early_once_the_budget_is_spent():
    steps = {"a": _FakeStep("a", [])}
    times, _, _ = time_interleaved(steps, Timer(torch.device("cpu")), warmup=1, reps=50, min_reps=3, budget_s=0.0)
    assert len(times["a"]) == 3


@pytest.mark.skipif(not LINUX_RSS, reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_rss_growth_measures_what_a_run_allocates():
    size = 48 << 20

    def allocate():
        block = torch.ones(size // 4)  # filled, so resident
        del block

    grown = memory.rss_growth(allocate)
    assert 0.95 * size <= grown <= 1.25 * size
    assert memory.rss_growth(lambda: None) < 4 << 20  # a run that allocates nothing


@pytest.mark.skipif(not LINUX_RSS, reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_memory_probe_counts_the_gradient_and_not_the_logits():
    # 1024 x 8192 fp32 = 32 MiB of logits. fwd+bwd must return a 32 MiB gradient, so any
    # correct measurement shows at least that; a no-grad smoothce forward keeps only
    # per-row results and block scratch (a few MiB), so the logits must not be counted.
    n, v = 1024, 8192
    logits_bytes = n * v * 4
    eager = memory.probe_in_fresh_process("torch-eager", n, v, "fp32", ["fwd+bwd"], 0.1, threads=1, seed=0)
    assert eager["fwd+bwd"]["peak_extra_bytes"] >= 0.95 * logits_bytes, eager
    # Both modes in one process: the second must not inherit the first one's peak.
    ours = memory.probe_in_fresh_process("smoothce", n, v, "fp32", ["fwd+bwd", "fwd"], 0.1, threads=1, seed=0)
    assert ours["fwd+bwd"]["peak_extra_bytes"] >= 0.95 * logits_bytes, ours
    assert ours["fwd"]["peak_extra_bytes"] < 0.5 * logits_bytes, ours


def test_cli_writes_tables_json_and_plots_with_ratios_from_one_run(tmp_path):
    out = tmp_path / "results"
    threads_before = torch.get_num_threads()
    # 64 x 3001: odd V (no power-of-two fast path); bf16 because it upcasts on the way.
    code = cli.main(
        ["--shapes", "64x3001", "--dtypes", "bf16", "--impls", "smoothce,torch-eager",
         "--reps", "3", "--min-reps", "3", "--warmup", "1", "--threads", "1", "--copy-mib", "8",
         "--no-progress", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    assert torch.get_num_threads() == threads_before  # --threads 1 applied to the run only
    record = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert record["environment"]["smoothce_backend"] == "cpu"
    assert record["environment"]["versions"]["torch"] == torch.__version__
    assert [(c["mode"], c["dtype"]) for c in record["cases"]] == [("fwd+bwd", "bf16"), ("fwd", "bf16")]
    for case in record["cases"]:
        results = case["results"]
        # Same run: both timed in every repetition, interleaved.
        assert len(results["smoothce"]["times_s"]) == len(results["torch-eager"]["times_s"]) == 3
        assert sorted(case["run_order"][:2]) == ["smoothce", "torch-eager"]
        assert all(entry["loss_ok"] for entry in results.values())
        speedup = results["torch-eager"]["median_s"] / results["smoothce"]["median_s"]
        assert case["ratios"]["torch-eager"]["speedup"] == pytest.approx(speedup)
        assert f"{speedup:#.3g}×".replace(".×", "×") in md
        assert all(entry["peak_extra_bytes"] >= 0 for entry in results.values())
    assert "| N × V | smoothce | torch-eager | speed-up vs torch-eager |" in md
    assert "Peak memory beyond the logits" in md
    for name in ("fwd_bwd-bf16.png", "fwd-bf16.png"):
        if HAVE_MATPLOTLIB:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in md
        else:  # the optional extra is missing: no plots, and the tables do not point at any
            assert not (out / name).exists()
            assert f"]({name})" not in md
    assert "speed-up vs torch-eager" in (out / "summary.md").read_text()


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


def test_loss_check_flags_an_implementation_that_computes_something_else(monkeypatch, tmp_path):
    # An implementation that forgets the label smoothing: it runs fine but must be marked.
    def build(label_smoothing, ignore_index):
        return lambda logits, target: torch.nn.functional.cross_entropy(logits, target)

    monkeypatch.setitem(IMPLEMENTATIONS, "no-smoothing", Implementation("no-smoothing", "wrong on purpose", build))
    settings = runner.Settings(
        device=torch.device("cpu"), shapes=[(16, 1000)], dtypes=["fp32"], modes=["fwd"],
        impls=["smoothce", "no-smoothing"], label_smoothing=0.1, reps=2, min_reps=2, memory=False,
        copy_bytes=1 << 20,
    )  # fmt: skip
    record = runner.run(settings, show_progress=False)
    results = record["cases"][0]["results"]
    assert results["smoothce"]["loss_ok"] is True
    assert results["no-smoothing"]["loss_ok"] is False
    assert "⚠" in report.markdown(record, plots=[])


def test_reference_loss_matches_the_float64_formula():
    logits, target = make_inputs(5, 33, "fp32", torch.device("cpu"), seed=1)
    z = logits.double()
    lam = 0.1
    rows = torch.logsumexp(z, 1) - (1 - lam) * z.gather(1, target[:, None])[:, 0] - lam / 33 * z.sum(1)
    assert reference_loss(logits, target, lam) == pytest.approx(float(rows.mean()), rel=1e-12)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "12x"], "12x"),
        (["--dtypes", "fp8"], "fp8"),
        (["--modes", "bwd"], "bwd"),
        (["--impls", "smoothce,nope"], "nope"),
        (["--impls", "liger"], "liger"),  # exists, but only on GPUs
        (["--shapes", "8x8", "--tokens", "8"], "--shapes"),
        (["--reps", "2", "--min-reps", "3"], "--min-reps"),
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
def test_torch_compile_baseline_runs_and_agrees(tmp_path):
    settings = runner.Settings(
        device=torch.device("cpu"), shapes=[(8, 1000)], dtypes=["fp32"], modes=["fwd+bwd"],
        impls=["smoothce", "torch-compile"], reps=2, min_reps=2, memory=False, copy_bytes=1 << 20,
    )  # fmt: skip
    record = runner.run(settings, show_progress=False)
    results = record["cases"][0]["results"]
    assert "error" not in results["torch-compile"], results["torch-compile"]
    assert results["torch-compile"]["loss_ok"] is True
    assert record["cases"][0]["ratios"]["torch-compile"]["speedup"] > 0


@pytest.mark.skipif(DEVICE.type == "cpu", reason="needs SMOOTHCE_TEST_DEVICE=cuda or xpu (the GPU nox sessions)")
def test_accelerator_events_and_allocator_memory():
    # The device-event timer and the allocator-statistics memory path, on the GPU the
    # session tests. 512 x 32000: the gradient (62.5 MiB fp32) is far above any allocator slack.
    settings = runner.Settings(
        device=DEVICE, shapes=[(512, 32000)], dtypes=["fp32"], modes=["fwd+bwd", "fwd"],
        impls=["smoothce", "torch-eager"], reps=3, min_reps=3, copy_bytes=64 << 20,
    )  # fmt: skip
    record = runner.run(settings, show_progress=False)
    logits_bytes = 512 * 32000 * 4
    for case in record["cases"]:
        for name, entry in case["results"].items():
            assert "error" not in entry, (name, entry)
            assert "memory_error" not in entry, (name, entry)
            assert entry["loss_ok"], (name, entry)
            assert all(t > 0 for t in entry["times_s"])
            if case["mode"] == "fwd+bwd":
                assert entry["peak_extra_bytes"] >= logits_bytes, (name, entry)
    assert record["environment"]["device_name"] == getattr(torch, DEVICE.type).get_device_name(DEVICE)
