"""The command line: instant --help (no torch, no generated file), the shared model flags, devices/dtypes."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from gpt2lab import configparse, devices
from gpt2lab.cli import COMMANDS, build_parser
from gpt2lab.errors import UserError

HELP_PROBE = """
import sys, time
start = time.perf_counter()
from gpt2lab.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(repr(('torch' in sys.modules, time.perf_counter() - start)), file=sys.stderr)
"""


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_is_instant_and_imports_no_torch(command):
    argv = [command, "--help"] if command else ["--help"]
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE.format(argv=argv)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    torch_loaded, seconds = eval(proc.stderr.strip().splitlines()[-1])
    print(f"gpt2lab {' '.join(argv)}: {seconds:.3f} s")
    assert "usage: gpt2lab" in proc.stdout
    assert not torch_loaded, (f"`gpt2lab {' '.join(argv)}` imported torch while building its parser (a command "
                              "module or a config module importing it at the top)")
    assert seconds < 2.0  # 0.5 s on an idle machine; loose because test machines are shared


def test_parsing_layers_import_no_torch():
    code = ("import sys, gpt2lab.configparse, gpt2lab.devices, gpt2lab.commands.common; "
            "print(sorted(m for m in ('torch', 'gpt2lab.config', 'gpt2lab.model') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


@dataclass
class _Inner:
    rate: float = 0.1
    """How fast."""


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    """The inner section."""
    name: str = "x"


def test_configparse_works_on_any_dataclass(tmp_path):
    cfg = _Outer()
    configparse.set_dotted(cfg, "inner.rate", "5e-1", "command line")
    assert cfg.inner.rate == 0.5
    with pytest.raises(UserError, match=r"^command line: unknown config key 'inner.rat'; did you mean 'inner.rate'\?$"):
        configparse.set_dotted(cfg, "inner.rat", "1", "command line")
    path = tmp_path / "c.yaml"
    path.write_text("name: y\ninner:\n  rate: fast\n")
    with pytest.raises(UserError, match=r"c\.yaml:3: inner.rate='fast' is not a valid FLOAT"):
        configparse.apply_yaml(cfg, path)
    assert configparse.field_docs(_Inner) == {"rate": "How fast."}
    assert configparse.to_dict(cfg) == {"inner": {"rate": 0.5}, "name": "y"}


BUILD_PROBE = """
import sys, time
from gpt2lab.cli import COMMANDS, build_parser
for name in COMMANDS:
    start = time.process_time()
    build_parser(name)
    print(repr((name, time.process_time() - start, 'torch' in sys.modules)))
"""


def test_every_parser_is_built_from_the_live_classes_fast_and_without_torch():
    """Each command's parser (train's: every RunConfig field), built in a fresh process in under 0.5 s of
    CPU time (imports included; CPU time, so a busy shared machine does not fail it) and importing no
    torch: the config classes are torch-free, so no generated file stands in for them."""
    proc = subprocess.run([sys.executable, "-c", BUILD_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [eval(line) for line in proc.stdout.splitlines()]
    assert [name for name, *_ in rows] == list(COMMANDS)
    for name, seconds, torch_loaded in rows:
        print(f"build_parser({name!r}): {seconds:.3f} s")
        assert not torch_loaded, f"building the parser of `gpt2lab {name}` imported torch"
        assert seconds < 0.5, f"building the parser of `gpt2lab {name}` took {seconds:.2f} s"


def test_no_generated_schema_ships():
    package = Path(configparse.__file__).parent
    assert not list(package.rglob("*.json"))  # configs/ holds the YAML presets only
    assert not any(hasattr(configparse, name) for name in ("load_schema", "build_schema", "write_schema", "main"))


# name -> (extra argv, default --device, default --dtype)
MODEL_COMMANDS = {
    "sample": (["--init", "gpt2"], "auto", "auto"),
    "chat": (["--init", "gpt2"], "auto", "auto"),
    "serve": (["--init", "gpt2"], "auto", "auto"),
    "bench": ([], "auto", "auto"),
    "convert": (["--init", "gpt2", "--out", "x"], "cpu", "fp32"),
    "merge-lora": (["--adapter", "a", "--out", "x"], "cpu", "fp32"),
    "eval": (["hellaswag"], "auto", "fp32"),
}


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_model_flags_are_shared_with_aliases_and_defaults(name, capsys):
    extra, device, dtype = MODEL_COMMANDS[name]
    _, parser = build_parser(name)
    args = parser.parse_args(extra)
    assert (args.device, args.dtype) == (device, dtype)
    for given, stored in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"), ("bf16", "bf16"),
                          ("auto", "auto")):
        assert parser.parse_args([*extra, "--dtype", given]).dtype == stored
    assert parser.parse_args([*extra, "--device", "cuda:1"]).device == "cuda:1"
    for flag, bad in (("--dtype", "fp8"), ("--device", "tpu")):
        with pytest.raises(SystemExit):
            parser.parse_args([*extra, flag, bad])
        assert f"unknown {flag[2:]} '{bad}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([*extra, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {device})" in text and f"(default: {dtype})" in text


def test_help_shows_defaults():
    text = " ".join(build_parser("sample")[1].format_help().split())
    assert "tokens to generate per answer (default: 200)" in text
    assert "with probability >= p (default: off) --seed SEED" in text
    text = " ".join(build_parser("model-info")[1].format_help().split())
    assert "Number of transformer blocks. (default: the preset's or --init's; GPTConfig: 12)" in text


def test_dtype_names():
    assert [devices.canonical_dtype(n) for n in ("float32", "bfloat16", "float16", "fp32", "auto")] == [
        "fp32", "bf16", "fp16", "fp32", "auto"]
    with pytest.raises(UserError, match="unknown dtype 'half'; use one of auto, fp32, bf16, fp16") as info:
        devices.canonical_dtype("half")
    assert "\n" not in str(info.value)
    assert devices.torch_dtype("bfloat16") is torch.bfloat16 and devices.torch_dtype("auto") is None
    assert devices.torch_dtype(torch.float16) is torch.float16
    assert [devices.dtype_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


def test_resolve_dtype_auto(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.resolve_dtype("auto", cpu) is torch.float32
    assert devices.resolve_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.resolve_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert devices.resolve_dtype("auto", cuda) is torch.float16  # training: fp16 + loss scaling
    assert devices.resolve_dtype("auto", cuda, fp16_without_bf16=False) is torch.float32  # bench


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cpu")  # auto never picks MPS
    assert devices.resolve_device("mps") == torch.device("mps")
    with pytest.raises(UserError, match="torch sees no CUDA GPU"):
        devices.resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        devices.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="'cuda:2' requested but this machine has 2 GPU"):
        devices.resolve_device("cuda:2")



def test_version(capsys):
    from gpt2lab import __version__
    from gpt2lab.cli import main

    assert main(["--version"]) == 0 and capsys.readouterr().out == f"gpt2lab {__version__}\n"
