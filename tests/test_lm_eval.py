"""gpt2lab as an lm-evaluation-harness backend: per-request numbers equal to lm-eval's `hf` backend on the
exported model, task metrics equal to `gpt2lab eval`, every architecture variant, and the front
`gpt2lab eval lm-eval`. Offline: lm-eval tasks read local task YAMLs over the shared data folder
(`write_local_tasks`), datasets offline, a fresh datasets cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from gpt2lab.cli import main  # noqa: E402
from gpt2lab.errors import UserError  # noqa: E402
from gpt2lab.evaluate import hellaswag, lambada, wikitext  # noqa: E402
from gpt2lab.evaluate import lm_eval_task as le  # noqa: E402
from gpt2lab.evaluate.harness import HarnessLM  # noqa: E402
from gpt2lab.evaluate.scoring import score_continuations  # noqa: E402
from gpt2lab.loading import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
DOCS = 20  # documents per task (wikitext: pages)
PAGES = 1
TASKS = ["hellaswag_local", "lambada_openai_local", "wikitext_local"]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """HF libraries offline, datasets cached in a fresh folder (restored afterwards)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("datasets_cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import datasets

    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_DATASETS_CACHE = Path(env["HF_DATASETS_CACHE"])
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tasks(offline, shared_data, tmp_path_factory) -> Path:
    """Local task YAMLs over the first DOCS documents of the shared HellaSwag, LAMBADA and WikiText-2."""
    folder = tmp_path_factory.mktemp("lm_tasks")
    assert le.write_local_tasks(folder, shared_data, limit=DOCS) == TASKS
    return folder


@pytest.fixture(scope="module")
def manager(tasks):
    return le.task_manager([str(tasks)])


@pytest.fixture(scope="module")
def gpt2_tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, its `gpt2lab convert` export) of a random GPT-2-vocabulary gpt2-tiny."""
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.model import GPT, GPTConfig

    root = tmp_path_factory.mktemp("gpt2_tiny")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", block_size=128))
    save_checkpoint(root / "ckpt", model, model.config, {"kind": "gpt2"}, step=1)
    assert main(["convert", "--init", str(root / "ckpt"), "--out", str(root / "hf")]) == 0
    return root / "ckpt", root / "hf"


@pytest.fixture(scope="module")
def trained_gpt2_tiny(tmp_path_factory, shared_data) -> tuple[Path, Path]:
    """(checkpoint, export) of a gpt2-tiny trained briefly on Tiny Shakespeare (GPT-2 BPE): logits shaped
    by data, unlike a random init's."""
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.model import GPT, GPTConfig
    from gpt2lab.tokenizer import GPT2Tokenizer

    root = tmp_path_factory.mktemp("trained_gpt2_tiny")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", block_size=128))
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:100_000]
    ids = torch.tensor(GPT2Tokenizer().encode(text))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        starts = torch.randint(0, len(ids) - 65, (4,)).tolist()
        batch = torch.stack([ids[s:s + 65] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 2  # it learned from the data
    model.eval()
    save_checkpoint(root / "ckpt", model, model.config, {"kind": "gpt2"}, step=30)
    assert main(["convert", "--init", str(root / "ckpt"), "--out", str(root / "hf")]) == 0
    return root / "ckpt", root / "hf"


def run(lm, manager, names, limit=DOCS):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager,
                                   bootstrap_iters=0, log_samples=True)


def responses(out: dict, task: str) -> list:
    """Every request's answer of `task`, in document order: (loglikelihood, greedy) or a rolling sum."""
    answers = []
    for sample in sorted(out["samples"][task], key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            answers.append(resp[0])
    return answers


def metrics(out: dict, task: str) -> dict[str, float]:
    return {k.split(",")[0]: v for k, v in out["results"][task].items()
            if "," in k and "stderr" not in k and isinstance(v, float)}


def native(model, tokenizer, shared_data, with_wikitext=True) -> dict[str, dict]:
    """gpt2lab's own scorer (`gpt2lab eval`'s tasks) on the documents the local tasks hold."""
    out = {
        "hellaswag_local": hellaswag.evaluate(model, tokenizer, hellaswag.load_tasks(shared_data / hellaswag.SHARED_FILE)[:DOCS]),
        "lambada_openai_local": lambada.evaluate(model, tokenizer, lambada.read_passages(shared_data / lambada.SHARED_FILE)[:DOCS]),
    }
    if with_wikitext:
        out["wikitext_local"] = wikitext.evaluate(model, tokenizer, wikitext.read_pages(shared_data / wikitext.SHARED_FILE)[:PAGES])
    return out


def assert_equal_to_native(out: dict, ours: dict) -> None:
    """lm-eval's task metrics from the backend equal gpt2lab's own scorer's."""
    hs, lam = metrics(out, "hellaswag_local"), metrics(out, "lambada_openai_local")
    assert hs["acc"] == ours["hellaswag_local"]["acc"] and hs["acc_norm"] == ours["hellaswag_local"]["acc_norm"]
    assert lam["acc"] == ours["lambada_openai_local"]["acc"]
    assert lam["perplexity"] == pytest.approx(ours["lambada_openai_local"]["ppl"], rel=1e-5)
    if "wikitext_local" in ours:
        wt = metrics(out, "wikitext_local")
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert wt[metric] == pytest.approx(ours["wikitext_local"][metric], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Equal to lm-eval's hf backend and to gpt2lab eval


@pytest.mark.parametrize("weights", ["gpt2_tiny", "trained_gpt2_tiny"])
def test_backend_equals_hf_backend_and_gpt2lab_eval(weights, request, manager, shared_data):
    from lm_eval.models.huggingface import HFLM

    ckpt, export = request.getfixturevalue(weights)
    model, tokenizer = load_model(str(ckpt))
    ours = {}
    for task, limit in (("hellaswag_local", DOCS), ("lambada_openai_local", DOCS), ("wikitext_local", PAGES)):
        ours[task] = run(HarnessLM(model, tokenizer, batch_size=16), manager, [task], limit)
        hf = run(HFLM(pretrained=str(export), batch_size=16, device="cpu", dtype="float32"), manager, [task], limit)
        a, b = responses(ours[task], task), responses(hf, task)
        assert len(a) == len(b) == {"hellaswag_local": 4 * DOCS, "lambada_openai_local": DOCS}.get(task, PAGES)
        for x, y in zip(a, b):
            if task == "wikitext_local":  # a page's sum over thousands of tokens: 1e-4 per 1,000 tokens
                assert x == pytest.approx(y, rel=1e-7, abs=1e-4)
            else:
                assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1] == y[1]
        theirs = metrics(hf, task)
        for metric, value in metrics(ours[task], task).items():
            assert value == pytest.approx(theirs[metric], rel=1e-6), (task, metric)
    merged = {"results": {t: o["results"][t] for t, o in ours.items()}}
    assert_equal_to_native(merged, native(model, tokenizer, shared_data))


def test_edge_requests_equal_hf_backend(gpt2_tiny, shared_data):
    """An empty context, a context longer than the model's window, trailing spaces, a greedy
    continuation and a rolling text longer than one window: equal to the hf backend."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from gpt2lab.sampling import generate

    ckpt, export = gpt2_tiny
    model, tokenizer = load_model(str(ckpt))
    ours = HarnessLM(model, tokenizer, batch_size=4)
    hf = HFLM(pretrained=str(export), batch_size=4, device="cpu", dtype="float32")
    long = " ".join(lambada.read_passages(shared_data / lambada.SHARED_FILE)[:3])
    assert len(tokenizer.encode(long)) > 2 * model.config.block_size
    greedy = tokenizer.decode(generate(model, [tokenizer.encode("The cat")], max_new_tokens=3, temperature=0.0)[0])
    pairs = [("", "Hello world"), (long, " the end"), ("The cat  ", "sat on the mat"), ("The cat", greedy),
             ("The cat", " sat")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    a, b = ours.loglikelihood(reqs), hf.loglikelihood(reqs, disable_tqdm=True)
    for x, y in zip(a, b):
        assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1] == y[1]
    assert a[3][1] is True  # the greedy continuation is greedy for both
    rolling = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate([long, "Short text."])]
    for x, y in zip(ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling, disable_tqdm=True)):
        assert x == pytest.approx(y, rel=1e-7, abs=1e-4)


def test_shared_contexts_score_like_separate_forwards():
    """score_continuations computes a context once for its continuations: the numbers are those of one
    plain forward per pair, with continuations of several tokens and of different lengths."""
    from gpt2lab.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", pos_emb="rope", n_kv_head=2, sliding_window=8)).eval()
    g = torch.Generator().manual_seed(1)
    contexts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (5, 12, 12)]
    pairs = [(c, torch.randint(0, 50257, (k,), generator=g).tolist()) for c in contexts for k in (1, 3, 7)]
    shared = score_continuations(model, pairs, batch_size=9)
    plain = score_continuations(model, pairs, batch_size=1, use_kv_cache=False)
    for s, p in zip(shared, plain):
        assert s.logprob == pytest.approx(p.logprob, abs=1e-4) and s.greedy == p.greedy


# --------------------------------------------------------------------------------------------------
# Every variant through --model gpt2lab, equal to gpt2lab's own scorer


def test_rope_gqa_sliding_window_model(tmp_path, manager, shared_data):
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.lm_eval import GPT2LabLM
    from gpt2lab.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", pos_emb="rope", n_kv_head=2, sliding_window=16, block_size=128))
    save_checkpoint(tmp_path / "rope", model, model.config, {"kind": "gpt2"}, step=1)
    lm = GPT2LabLM(init=str(tmp_path / "rope"), dtype="auto", device="cpu", batch_size=16)
    out = {"results": {}}
    for task, limit in (("hellaswag_local", DOCS), ("lambada_openai_local", DOCS), ("wikitext_local", PAGES)):
        out["results"].update(run(lm, manager, [task], limit)["results"])
    assert_equal_to_native(out, native(*load_model(str(tmp_path / "rope")), shared_data))


def test_char_level_model(tmp_path, manager, shared_data):
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.lm_eval import GPT2LabLM
    from gpt2lab.model import GPT, GPTConfig
    from gpt2lab.tokenizer import CharTokenizer

    text = "".join(json.loads(line)["text"] for line in (shared_data / lambada.SHARED_FILE).read_text().splitlines())
    text += (shared_data / hellaswag.SHARED_FILE).read_text()
    tokenizer = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=tokenizer.vocab_size, block_size=256))
    save_checkpoint(tmp_path / "char", model, model.config, tokenizer.to_dict(), step=1)
    lm = GPT2LabLM(init=str(tmp_path / "char"), device="cpu", batch_size=16)
    out = run(lm, manager, ["hellaswag_local", "lambada_openai_local"])
    model, tokenizer = load_model(str(tmp_path / "char"))
    ours = native(model, tokenizer, shared_data, with_wikitext=False)["hellaswag_local"]
    assert metrics(out, "hellaswag_local") == {"acc": ours["acc"], "acc_norm": ours["acc_norm"]}
    # gpt2lab's lambada scores the last word's characters, lm-eval's " " + the word: compare per request
    docs = [d for d in out["samples"]["lambada_openai_local"]]
    pairs = [lm.encode_request(*s["arguments"][0]) for s in sorted(docs, key=lambda s: s["doc_id"])]
    assert [p[1][0] for p in pairs] == [tokenizer.encode(" ")[0]] * DOCS
    for got, want in zip(responses(out, "lambada_openai_local"), score_continuations(model, pairs)):
        assert got[0] == pytest.approx(want.logprob, abs=1e-4) and got[1] == want.greedy


def test_unmerged_lora_adapter(tmp_path, gpt2_tiny, manager, shared_data):
    from gpt2lab.lm_eval import GPT2LabLM
    from gpt2lab.lora import LoraConfig, LoRALinear, apply_lora, save_adapter

    ckpt, _ = gpt2_tiny
    model, _ = load_model(str(ckpt))
    cfg = LoraConfig(r=2)
    apply_lora(model, cfg)
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.5)  # a trained adapter changes the scores
    save_adapter(tmp_path / "adapter", model, cfg, base_init=str(ckpt), tokenizer={"kind": "gpt2"})
    lm = GPT2LabLM(init=str(tmp_path / "adapter"), device="cpu", batch_size=16)
    assert any(isinstance(m, LoRALinear) for m in lm.model.modules())  # not merged
    out = run(lm, manager, ["hellaswag_local", "lambada_openai_local"])
    merged, tokenizer = load_model(str(tmp_path / "adapter"))  # merged: gpt2lab eval's model
    assert_equal_to_native(out, native(merged, tokenizer, shared_data, with_wikitext=False))
    base = run(GPT2LabLM(init=str(ckpt), device="cpu", batch_size=16), manager, ["lambada_openai_local"])
    assert metrics(base, "lambada_openai_local")["perplexity"] != metrics(out, "lambada_openai_local")["perplexity"]


def test_generate_until_is_greedy_generation_cut_at_stop_strings(gpt2_tiny):
    from lm_eval.api.instance import Instance

    from gpt2lab.sampling import generate

    model, tokenizer = load_model(str(gpt2_tiny[0]))
    lm = HarnessLM(model, tokenizer, batch_size=2)
    prompts = ["The cat sat on", "Once upon a time, in a land far away,", "Hello"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 12}), i) for i, p in enumerate(prompts)]
    got = lm.generate_until(reqs)
    for prompt, text in zip(prompts, got):
        ids = generate(model, [tokenizer.encode(prompt)], max_new_tokens=12, temperature=0.0, tokenizer=tokenizer)[0]
        assert text == tokenizer.decode(ids).split("\n\n")[0]


# --------------------------------------------------------------------------------------------------
# gpt2lab eval lm-eval, in training, and the lm_eval CLI


def test_gpt2lab_eval_lm_eval_front(gpt2_tiny, tasks, shared_data, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["eval", "lm-eval", "--init", str(gpt2_tiny[0]), "--tasks", "lambada_openai_local",
                 "--include-path", str(tasks), "--limit", "10", "--batch-size", "auto", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "lambada_openai_local/acc" in table and "lambada_openai_local/perplexity" in table
    result = json.loads(out.read_text())
    model, tokenizer = load_model(str(gpt2_tiny[0]))
    ours = lambada.evaluate(model, tokenizer, lambada.read_passages(shared_data / lambada.SHARED_FILE)[:10])
    assert result["lambada_openai_local/perplexity"] == pytest.approx(ours["ppl"], rel=1e-5)
    assert result["n"] == {"lambada_openai_local": 10}


def test_lm_eval_task_during_training(gpt2_tiny, tasks, shared_data):
    from gpt2lab.config import EvalConfig
    from gpt2lab.evaluate.registry import get_task
    from gpt2lab.evaluate.training import TaskEvaluator, task_schedule

    name = f"lm-eval:{tasks / 'lambada_openai_local.yaml'}"
    names, every, limit = task_schedule(EvalConfig(tasks=[name], every=10, limit=5))
    model, tokenizer = load_model(str(gpt2_tiny[0]))
    logged = TaskEvaluator([get_task(n) for n in names], limit, model, tokenizer)()
    ours = lambada.evaluate(model, tokenizer, lambada.read_passages(shared_data / lambada.SHARED_FILE)[:5])
    assert logged[f"{name}/perplexity"] == pytest.approx(ours["ppl"], rel=1e-5)
    assert logged[f"{name}/acc"] == ours["acc"]


def plugin_site(tmp_path: Path) -> Path:
    """A site-packages folder as `pip install gpt2lab` leaves one: gpt2lab_lm_eval.pth and a distribution
    whose entry points are pyproject.toml's "lm_eval.models" group (the code itself is on PYTHONPATH)."""
    site_dir = tmp_path / "site"
    dist = site_dir / "gpt2lab_probe-0.dist-info"
    dist.mkdir(parents=True)
    (site_dir / "gpt2lab_lm_eval.pth").write_text((REPO / "src" / "gpt2lab_lm_eval.pth").read_text())
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gpt2lab-probe\nVersion: 0\n")
    entry = [line for line in (REPO / "pyproject.toml").read_text().split("[project.entry-points.\"lm_eval.models\"]")[1]
             .splitlines() if line.strip()][0]
    (dist / "entry_points.txt").write_text("[lm_eval.models]\n" + entry.replace('"', "") + "\n")
    return site_dir


def test_lm_eval_registry_resolves_model_gpt2lab(tmp_path):
    """The installed .pth hook and the "lm_eval.models" entry point make --model gpt2lab known to lm-eval's
    registry (where the `lm_eval` command looks it up), next to lm-eval's own backends."""
    code = ("import site, sys; site.addsitedir(sys.argv[1]); from lm_eval.api.registry import get_model; "
            "print(get_model('gpt2lab').__module__, get_model('hf').__name__)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", code, str(plugin_site(tmp_path))], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["gpt2lab.lm_eval", "HFLM"]


@pytest.mark.slow
def test_lm_eval_command_runs_model_gpt2lab(tmp_path, tasks, offline, gpt2_tiny, shared_data):
    """`lm_eval --model gpt2lab --model_args init=...` (lm-eval's own command line, its main function run
    after site-packages is read) scores a checkpoint with no code; the numbers are gpt2lab eval's."""
    code = ("import site, sys; site.addsitedir(sys.argv.pop(1)); from lm_eval.__main__ import cli_evaluate; "
            "sys.argv[0] = 'lm_eval'; cli_evaluate()")
    out = tmp_path / "out"
    args = ["--model", "gpt2lab", "--model_args", f"init={gpt2_tiny[0]},dtype=fp32", "--tasks", "lambada_openai_local",
            "--include_path", str(tasks), "--limit", "5", "--batch_size", "8", "--device", "cpu",
            "--output_path", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", code, str(plugin_site(tmp_path)), *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["lambada_openai_local"]
    model, tokenizer = load_model(str(gpt2_tiny[0]))
    ours = lambada.evaluate(model, tokenizer, lambada.read_passages(shared_data / lambada.SHARED_FILE)[:5])
    assert results["perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Bad input and no network


def test_unknown_task_suggests_close_names(manager):
    with pytest.raises(UserError, match=r"'lambada_openai_locl' is not an lm-eval task; did you mean 'lambada_openai_local'"):
        le.check_task_names(["lambada_openai_locl"], manager)


def test_task_whose_data_cannot_be_fetched_is_one_line(tmp_path, manager):
    (tmp_path / "remote.yaml").write_text("task: remote_only\ndataset_path: gpt2lab-test/not-on-this-machine\n"
                                          "output_type: loglikelihood\ntest_split: test\ndoc_to_text: \"{{text}}\"\n"
                                          "doc_to_target: \"{{text}}\"\n")
    with pytest.raises(UserError) as e:
        le.fetch_task_data([str(tmp_path / "remote.yaml")], manager)
    message = str(e.value)
    assert "\n" not in message and "remote.yaml'" in message
    assert "dataset_path: json" in message and "--include-path" in message


def test_without_lm_eval_installed_one_line_says_how(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(UserError, match=r'pip install "gpt2lab\[eval\]"'):
        le.require_lm_eval()


# --------------------------------------------------------------------------------------------------
# The multiple-choice room


def test_a_multiple_choice_task_is_a_parser(tmp_path, gpt2_tiny):
    """A PIQA-like task (two or three choices per question) is a `load` on MultipleChoiceTask: its numbers
    are the argmax of each choice's log-likelihood, scored pair by pair."""
    from gpt2lab.evaluate.multiple_choice import MultipleChoiceTask, Question
    from gpt2lab.fileio import iter_jsonl

    class Piqa(MultipleChoiceTask):
        name = "piqa"
        description = "PIQA-like"
        data_help = "a jsonl of {goal, sols, label}"

        def load(self, path, options):
            return [Question(r["goal"], tuple(r["sols"]), r["label"]) for _, r in iter_jsonl(path)]

    records = [{"goal": "To open a jar,", "sols": ["twist the lid.", "hit it with a fish."], "label": 0},
               {"goal": "To dry wet hair,", "sols": ["use a towel.", "pour water on it.", "sing."], "label": 0},
               {"goal": "To boil water,", "sols": ["freeze it.", "heat it on a stove."], "label": 1}]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    task = Piqa()
    assert not task.has_default_data() and task.find_data() is None
    questions = task.load(tmp_path / "piqa.jsonl", task.default_options())
    model, tokenizer = load_model(str(gpt2_tiny[0]))
    result = task.run(model, tokenizer, questions, task.default_options(), batch_size=2)
    correct = 0
    for q in questions:
        lls = [s.logprob for s in score_continuations(model, [lm_pair(tokenizer, q.context, " " + c) for c in q.choices],
                                                      batch_size=1, use_kv_cache=False)]
        correct += max(range(len(lls)), key=lls.__getitem__) == q.label
    assert result["n"] == 3 and result["acc"] == correct / 3
    assert [row.metric for row in task.rows(result)] == ["acc", "acc_norm", "acc_token_mean", "n"]


def lm_pair(tokenizer, context, continuation):
    from gpt2lab.evaluate.scoring import encode_pair

    return encode_pair(tokenizer, context, continuation)


def test_the_start_up_hook_imports_next_to_nothing():
    """`gpt2lab_lm_eval.pth` runs the hook in every interpreter of the environment: importing and
    installing it loads none of the modules that cost time at every interpreter start (typing,
    importlib.abc and what it pulls in: ~20 ms), only the interpreter's own light ones."""
    import ast

    import gpt2lab

    code = ("import sys; before = set(sys.modules); import gpt2lab.lm_eval_plugin as p; p.install(); "
            "print(sorted(set(sys.modules) - before))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(gpt2lab.__file__).parents[1])
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = set(ast.literal_eval(out.stdout))
    assert {"gpt2lab", "gpt2lab.lm_eval_plugin"} <= loaded
    assert loaded <= {"gpt2lab", "gpt2lab.lm_eval_plugin", "__future__", "importlib", "importlib._bootstrap",
                      "importlib._bootstrap_external", "types", "warnings"}, sorted(loaded)
