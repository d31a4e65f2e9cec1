"""Run config: presets, dotted overrides and coercion, error messages, --help."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2lab.cli import main
from gpt2lab.config import (
    RunConfig,
    from_dict,
    get_dotted,
    iter_fields,
    load_config,
    preset_names,
    to_dict,
    to_yaml,
)
from gpt2lab.errors import UserError


def test_defaults_preset_and_override_precedence(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  warmup_steps: 7\ntrain:\n  max_steps: 50\n")
    cfg = load_config(str(path), ["--optim.lr", "3e-4", "--train.max_steps=60"])
    assert cfg.optim.lr == 3e-4  # CLI beats YAML
    assert cfg.optim.warmup_steps == 7  # YAML beats default
    assert cfg.train.max_steps == 60
    assert cfg.optim.weight_decay == RunConfig().optim.weight_decay  # untouched default
    assert cfg.name == "exp" and str(cfg.out_dir) == "out/exp"


@pytest.mark.parametrize("argv, key, expected", [
    (["--optim.lr", "6e-4"], "optim.lr", 6e-4),  # YAML 1.1 would read "6e-4" as text
    (["--train.max_steps", "1_000"], "train.max_steps", 1000),
    (["--train.tokens_per_step=5.24288e5"], "train.tokens_per_step", 524288),
    (["--train.compile"], "train.compile", True),  # a bare flag means true
    (["--train.compile", "false"], "train.compile", False),
    (["--eval.hellaswag_limit", "null"], "eval.hellaswag_limit", None),
    (["--optim.betas", "[0.9, 0.99]"], "optim.betas", (0.9, 0.99)),
    (["--lora.targets", "c_attn,c_fc"], "lora.targets", ["c_attn", "c_fc"]),
    (["--model.sliding_window", "[4, null]"], "model.sliding_window", [4, None]),
    (["--model.sliding_window", "16"], "model.sliding_window", 16),
    (["--checkpoint.resume", "auto"], "checkpoint.resume", "auto"),
    (["--checkpoint.resume", "true"], "checkpoint.resume", True),
    (["--optim.fused", "auto"], "optim.fused", "auto"),
    (["--checkpoint.out_dir", "123"], "checkpoint.out_dir", "123"),
])
def test_override_coercion(argv, key, expected):
    cfg = load_config(None, argv)
    value = get_dotted(cfg, key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("argv, message", [
    (["--train.lr", "1"], "unknown config key 'train.lr'; did you mean 'optim.lr'?"),
    (["--optim.weight_dcay", "0"], "did you mean 'optim.weight_decay'?"),
    (["--trian.seed", "1"], "did you mean 'train.seed'?"),
    (["--train.max_steps", "ten"], "train.max_steps='ten' is not a valid INT"),
    (["--train.compile", "maybe"], "train.compile='maybe' is not a valid BOOL"),
    (["--optim.schedule", "linear"], "optim.schedule='linear' is not one of 'cosine', 'constant', 'wsd'"),
    (["--model.preset", "gpt3"], "model.preset 'gpt3' is unknown"),
    (["--optim.betas", "[0.9]"], "optim.betas='[0.9]' is not a valid LIST: expected a list of 2 values"),
])
def test_bad_overrides_are_one_line_errors(argv, message):
    with pytest.raises(UserError) as info:
        load_config(None, argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 10\n  seed: [1, 2\noptim:\n  lr: 1\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  max_steps: 10\n  micro_batch: 4\n")
    with pytest.raises(UserError, match=r"typo\.yaml:3: unknown config key 'train.micro_batch'; "
                                        r"did you mean 'train.micro_batch_size'\?"):
        load_config(str(typo))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  lr: fast\n")
    with pytest.raises(UserError, match=r"wrong\.yaml:2: optim.lr='fast' is not a valid FLOAT"):
        load_config(str(wrong))
    with pytest.raises(UserError, match="unknown config 'quikstart'.*did you mean 'quickstart'"):
        load_config("quikstart")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert from_dict(to_dict(cfg)) == cfg
    assert to_yaml(cfg).startswith("model:")


def test_presets_shipped():
    assert {"quickstart", "shakespeare_char", "shakespeare_char_cpu", "shakespeare", "gpt2_124m_owt",
            "gpt2_124m_fineweb"} <= set(preset_names())
    fw = load_config("gpt2_124m_fineweb")
    assert (fw.train.tokens_per_step, fw.optim.lr, fw.optim.min_lr, fw.optim.warmup_steps, fw.train.max_steps,
            fw.model.padded_vocab_size, fw.eval.hellaswag_every) == (524288, 6e-4, 6e-5, 715, 19073, 50304, 250)


def test_help_lists_every_field_with_meaning_and_default(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for key, _, _, doc in iter_fields(RunConfig):
        assert f"--{key}" in text
        assert doc and " ".join(doc.split()[:4]) in text, key
    assert "Peak learning rate (after warmup). (default: 0.0006)" in text


def test_unknown_cli_flag_is_one_line_with_suggestion(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--train.lr", "1"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "gpt2lab train: error: unknown config key 'train.lr'; did you mean 'optim.lr'?\n"


@pytest.mark.parametrize("argv, message", [
    (["--optim.schedule", "cosin"], "optim.schedule='cosin' is not one of 'cosine', 'constant', 'wsd'; "
                                    "did you mean 'cosine'?"),
    (["--parallel.strategy", "zero"], "parallel.strategy='zero' is not one of 'auto', 'none', 'ddp', 'fsdp'"),
    (["--train.dtype", "bfloat16"], "train.dtype='bfloat16' is not one of 'auto', 'fp32', 'bf16', 'fp16'; "
                                    "did you mean 'bf16'?"),
    (["--model.pos_emb", "alibi"], "model.pos_emb='alibi' is not one of 'learned', 'rope'"),
    (["--optim.fused", "sometimes"], "optim.fused='sometimes' is not one of true, false, 'auto'"),
    (["--data.format", "SFT"], "data.format='SFT' is not one of 'tokens', 'sft'; did you mean 'sft'?"),
])
def test_choice_fields_reject_other_values_in_one_line(argv, message):
    with pytest.raises(UserError) as info:
        load_config(None, argv)
    assert str(info.value) == f"command line: {message}"


def test_choice_errors_name_the_yaml_line_and_values_set_in_python(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dir: d\n  order: sequentail\n")
    with pytest.raises(UserError, match=r"^.*bad\.yaml:3: data.order='sequentail' is not one of 'random', "
                                        r"'sequential'; did you mean 'sequential'\?$"):
        load_config(str(bad))
    cfg = RunConfig()
    cfg.data.sft.truncation = "cut"
    with pytest.raises(UserError, match=r"^data.sft.truncation='cut' is not one of 'truncate', 'drop'$"):
        cfg.validate()


def test_choice_values_are_written_once():
    """No module repeats the values of a choice field: consumers take them from its Literal."""
    import ast
    import typing

    import gpt2lab
    from gpt2lab import config, devices, parallel
    from gpt2lab.data import loader

    choices = {frozenset(typing.get_args(tp)) for key, tp, *_ in iter_fields(RunConfig) if "Literal[" in str(tp)}
    choices = {c - {None} for c in choices}
    assert {"cosine", "wsd"} < max(choices, key=lambda c: "wsd" in c) and len(choices) >= 10
    repeated = []
    for path in Path(gpt2lab.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        literal_args = {id(n.slice) for n in ast.walk(tree) if isinstance(n, ast.Subscript)
                        and isinstance(n.value, ast.Name) and n.value.id == "Literal"}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and id(node) not in literal_args:
                values = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
                if len(values) == len(node.elts) > 1 and frozenset(values) in choices:
                    repeated.append(f"{path.name}:{node.lineno}: {values}")
    assert not repeated, "\n".join(repeated)
    assert parallel.STRATEGIES == typing.get_args(config.Strategy)
    assert parallel.ACTIVATION_CHECKPOINTING == typing.get_args(config.ActivationCheckpointing)
    assert loader.ORDERS == typing.get_args(config.DataOrder)
    assert typing.get_args(devices.DtypeName) == devices.DTYPE_CHOICES == ("auto", *devices.DTYPES)


def test_help_shows_the_choices_and_the_result_changing_settings(capsys):
    from gpt2lab import run
    from gpt2lab.config import RESULT_CHANGING, CheckpointConfig
    from gpt2lab.configparse import field_docs

    assert run.RESULT_CHANGING is RESULT_CHANGING
    doc = field_docs(CheckpointConfig)["allow_changes"]
    for key in RESULT_CHANGING:
        assert (key + "*" if key.endswith(".") else key) in doc
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--optim.schedule cosine|constant|wsd" in text
    assert "--train.dtype auto|fp32|bf16|fp16" in text
    assert "--optim.fused BOOL|auto" in text
    assert "train.max_time, train.dtype, train.fused_loss, data.order" in text
