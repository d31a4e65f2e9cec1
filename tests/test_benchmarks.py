"""The benchmark scripts run, on a tiny preset, and report what they promise: ratios against
transformers, the fraction of the measured matmul peak, the weight-read floor of decoding, fp32 and
bf16 side by side and what dtype auto picks. (Their numbers are not checked: speed is shown by benchmarks, not by tests.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPT2LAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_train_reports_ratios_and_fraction_of_peak(tmp_path):
    out = run_script("bench_train.py", "--preset", "gpt2-tiny", "--batch", "2", "--seq", "32", "--repeats", "1",
                     "--bf16", "yes", "--json", tmp_path=tmp_path)
    record = json.loads(out.strip().splitlines()[-1])
    names = {"gpt2lab fp32", "transformers fp32", "gpt2lab bf16 autocast", "transformers bf16 autocast"}
    assert set(record["tok_s"]) == names and set(record["fraction_of_peak"]) == names
    assert all(0 < f for f in record["fraction_of_peak"].values())
    assert {"fp32", "bf16"} <= set(record["ratios"]) and set(record["peak_flops"]) == {"fp32", "bf16"}
    assert record["auto_dtype"] and record["machine"] and record["load_average"]


def test_bench_train_table_says_why_bf16_is_not_timed(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CPU_DTYPE", "fp32")  # auto = fp32 here: bf16 is not timed unless asked
    out = run_script("bench_train.py", "--preset", "gpt2-tiny", "--batch", "2", "--seq", "32", "--repeats", "1",
                     tmp_path=tmp_path)
    assert "of the fp32 peak" in out and "measured matmul peak (median of the turns): fp32" in out
    assert "bf16 autocast not timed" in out and "ratio gpt2lab / transformers, fp32:" in out
    assert "as gpt2lab train runs it / transformers default" in out


def test_bench_decode_reports_the_floor_and_the_auto_choice(tmp_path):
    out = run_script("bench_decode.py", "--preset", "gpt2-tiny", "--new-tokens", "4", "--reps", "1",
                     "--bandwidth-mb", "16", tmp_path=tmp_path)
    table = out.split("of floor", 1)[1]
    for name in ("gpt2lab fp32", "transformers fp32", "gpt2lab bf16", "floor fp32", "floor bf16"):
        assert any(line.startswith(name) and line.rstrip().endswith("%") for line in table.splitlines()), name
    assert "sample --dtype auto here:" in out
    assert "gpt2lab auto (" in out
    steps = out.split("decode steps only", 1)[1].split("\n\n", 1)[0]
    for name in ("gpt2lab fp32", "gpt2lab bf16"):
        assert any(line.startswith(name) and line.rstrip().endswith("%") for line in steps.splitlines()), name
    # gpt2lab next to llama.cpp at each precision, against the memory bandwidth measured in the same run
    table = out.split("against the memory-bandwidth floor: read bandwidth", 1)[1].split("\n\n", 1)[0]
    names = ["gpt2lab fp32", "gpt2lab bf16", "gpt2lab int8"]
    try:
        import llama_cpp  # noqa: F401

        names += ["llama.cpp f32", "llama.cpp f16", "llama.cpp q8_0"]
        assert "gpt2lab / llama.cpp, decode steps: fp32 / f32" in table
        assert "greedy tokens of llama.cpp f32 equal to gpt2lab fp32: " in out
    except ImportError:
        assert "llama.cpp not timed: llama-cpp-python is not installed" in table
    for name in names:
        assert any(line.startswith(name) and line.rstrip().endswith("%") for line in table.splitlines()), name


def test_bench_precision_reports_both_dtypes_and_the_auto_choice(tmp_path):
    out = run_script("bench_precision.py", "--preset", "gpt2-tiny", "--steps", "1", "--reps", "1", "--new-tokens", "3",
                     "--json", tmp_path=tmp_path)
    record = json.loads(out.strip().splitlines()[-1])
    assert set(record["results"]) == {"train quickstart (0.8M)", "train gpt2-tiny", "decode gpt2-tiny"}
    for result in record["results"].values():
        assert all(result["median_s"][dtype] > 0 for dtype in ("fp32", "bf16")) and result["bf16_speedup"] > 0
        assert result["auto"] in ("fp32", "bf16") and result["auto_evidence"].startswith(result["auto"] + " (bf16 ")
        assert result["auto_right"] == (result["auto"] == result["called_for"])
    assert record["results"]["train quickstart (0.8M)"]["shape"] == "12x64 tokens"  # the quickstart's micro-batch
    assert set(record["flags"]) == {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"} and record["cpu"]
    assert record["torch"] and record["date"] and len(record["load_average"]["before"]) == 3


def test_the_speedrun_replaces_only_its_own_runs(tmp_path):
    """benchmarks/speedrun_shakespeare_char.py once deleted its whole --out folder before running:
    now it takes a new or empty folder, or one it marked, and replaces only its recipes' runs there."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import speedrun_shakespeare_char as speedrun
    finally:
        sys.path.pop(0)
    mine = tmp_path / "mine"
    speedrun.claim_out(mine)
    (mine / "ours").mkdir()
    (mine / "ours" / "metrics.jsonl").write_text("{}\n")
    (mine / "notes.txt").write_text("kept")
    speedrun.claim_out(mine)
    assert not (mine / "ours").exists() and (mine / "notes.txt").read_text() == "kept"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit, match="holds files this script did not make"):
        speedrun.claim_out(theirs)
    assert (theirs / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        speedrun.claim_out(tmp_path / "file")


@pytest.mark.slow
def test_bench_lm_eval_reports_both_backends(tmp_path, shared_data, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("GPT2LAB_SHARED_DATA", str(shared_data))  # its HellaSwag file
    out = run_script("bench_lm_eval.py", "--limit", "4", "--preset", "gpt2-tiny", "--json", tmp_path=tmp_path)
    record = json.loads(out.strip().splitlines()[-1])
    assert set(record["seconds"]) == {"gpt2lab", "hf"} and record["ratio"] > 0
    assert record["metrics_equal"] and record["max_loglikelihood_diff"] < 1e-4
    assert "x faster; metrics equal" in out


def test_bench_tokenizer_reports_training_and_the_prepare_ratio(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("GPT2LAB_SHARED_DATA", str(shared_data))  # its corpus
    out = run_script("bench_tokenizer.py", "--mb", "0.3", "--train-mb", "0.2", "--vocab-size", "600", "--repeats", "1",
                     "--json", tmp_path=tmp_path)
    record = json.loads(out.strip().splitlines()[-1])
    assert set(record["prepare_mb_s"]) == {"gpt2 (tiktoken)", "trained BPE"}
    assert record["ratio"] > 0 and record["train_s"] > 0 and record["vocab_size"] == 600
    assert "ratio trained BPE / tiktoken" in out


def test_bench_serve_reports_rates_latencies_and_ratios(tmp_path):
    out = run_script("bench_serve.py", "--preset", "gpt2-tiny", "--clients", "1,2", "--new-tokens", "4",
                     "--requests", "1", "--no-transformers", "--json", tmp_path=tmp_path)
    record = json.loads(out.strip().splitlines()[-1])
    assert [(r["server"], r["clients"]) for r in record["rows"]] == [("gpt2lab serve", 1), ("gpt2lab serve", 2)]
    assert all(r["tok_s"] > 0 and r["chunks"] > 0 and r["ttft_p95"] >= r["ttft_p50"] > 0 for r in record["rows"])
    assert "gpt2lab serve: 2 clients / 1" in record["ratios"] and "TTFT p50" in out
