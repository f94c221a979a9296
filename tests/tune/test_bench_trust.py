"""An honest bench: spread of every figure, device sync around timers, load and plausibility warnings."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner

from deploykit.cli import main
from deploykit.tune import timing as T


def test_timers_wait_for_the_device():
    log: list[str] = []
    T.time_interleaved({"a": lambda: log.append("run a"), "b": lambda: log.append("run b")}, warmup=1, repeats=2,
                       sync=lambda: log.append("sync"))
    warm, timed = log[:4], log[4:]
    assert warm == ["run a", "sync", "run b", "sync"]
    assert timed == ["sync", "run a", "sync", "sync", "run b", "sync"] * 2  # sync before start and before stop


def test_spread_and_per_repeat_ratios():
    assert T.spread([0.003, 0.001, 0.002], 1000.0) == {"min": 1.0, "median": 2.0, "max": 3.0}
    r = T.ratio_spread([2.0, 4.0, 3.0], [1.0, 1.0, 2.0])
    assert r == {"min": 1.5, "median": 2.0, "max": 4.0}


def test_busy_machine_is_named_with_its_load():
    n = T.cores()
    busy = T.load_warnings([n * 0.5 + 1.0, 1.0, 1.0], [n * 0.5 + 3.5, 1.0, 1.0], own_threads=2)
    assert len(busy) == 2 and "machine busy before" in busy[0] and f"{n * 0.5 + 1.0:.2f} on {n} cores" in busy[0]
    assert "above this bench's own 2 thread(s)" in busy[1]
    # the bench's own threads don't count as "busy"
    assert T.load_warnings([0.0, 0.0, 0.0], [2.0 + n * 0.5 - 0.1, 0.0, 0.0], own_threads=2) == []


def test_measured_cpu_shares_decide_busy_where_there_are_some():
    n = T.cores()
    high_load = [n * 0.5 + 1.0, 1.0, 1.0]  # what a training run just before leaves in the 1-minute average
    assert T.load_warnings(high_load, high_load, own_threads=2, others_before=0.02, others_during=0.05) == []
    busy = T.load_warnings([0.1, 0, 0], [0.1, 0, 0], own_threads=2, others_before=0.6, others_during=0.4)
    assert len(busy) == 2 and "used 60% of the" in busy[0] and "used 40% of the" in busy[1]


def test_other_processes_cpu_is_measured():
    """A process spinning on one core is seen as another process's share; this process's own work is not."""
    import subprocess
    import sys

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(0.3)
        share = T.idle_share(1.0)
    finally:
        spin.kill()
        spin.wait()
    assert share is not None and share >= 0.6 / T.cores(), share  # one of the cores, less what the host took
    a = T.cpu_snapshot()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.5:  # this process busy: its own CPU is subtracted
        pass
    own = T.others_share(a, T.cpu_snapshot())
    assert own is not None and own < share


def test_implausible_ratios_are_flagged_beyond_the_spread():
    mono = {"min": 1.0, "median": 1.1, "max": 1.2}
    ok = T.ratio_warnings(1, 2.0, {"min": 1.5, "median": 1.9, "max": 2.3}, mono, {"min": 1.1, "median": 1.3,
                                                                                   "max": 1.4})
    assert ok == []  # a speed-up whose spread reaches the ideal is not flagged
    bad = T.ratio_warnings(32, 3.79, {"min": 6.9, "median": 7.15, "max": 7.3}, mono,
                           {"min": 0.5, "median": 0.6, "max": 0.9})
    assert "exceeds the ideal 3.79x" in bad[0] and "7.15x" in bad[0]
    assert "chain without exits" in bad[1]


def test_bench_cli_reports_spread_load_and_one_line(trained_engine, tmp_path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", str(trained_engine), "--data", "digits", "--batch-sizes", "1,4",
                                  "--samples", "8", "--repeats", "3", "--warmup", "1", "--exit-fractions",
                                  "0.4,0.3,0.2,0.1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) == 1 and "speed-up" in r.stdout and str(out) in r.stdout
    rep = json.loads(out.read_text())
    assert rep["inputs"] == "digits test split" and len(rep["loadavg_start"]) == 3 and len(rep["loadavg_end"]) == 3
    for run in rep["runs"]:
        for v in ("monolithic", "chain_noexit", "cascade"):
            s = run["spread_ms"][v]
            assert s["min"] <= s["median"] == run[f"{v}_ms"] <= s["max"]
        s = run["speedup_spread"]
        assert s["min"] <= s["median"] <= s["max"]
        assert abs(run["speedup"] - run["monolithic_ms"] / run["cascade_ms"]) < 1e-9
    # every warning in the report is on stderr, and a busy start is always among them
    assert [ln[len("warning: "):] for ln in r.stderr.splitlines() if ln.startswith("warning: ")] == rep["warnings"]
    before, during = rep["other_cpu_share_before"], rep["other_cpu_share_during"]
    assert 0.0 <= before <= 1.0 and 0.0 <= during <= 1.0
    assert (before > T.BUSY_SHARE) == any(w.startswith("machine busy before the bench") for w in rep["warnings"])
    assert (tmp_path / "b.png").stat().st_size > 10_000
