"""The one place that builds a training run from a RunConfig (used by `gpt2lab train` and `finetune`).

    from gpt2lab.config import load_config
    from gpt2lab.run import train
    result = train(load_config("quickstart", ["--train.max_steps", "100"]))

Order: process group -> run directory checks (before any work) -> data (prepared on first use) ->
model (scratch, preset or pretrained `init`) -> LoRA -> parallel wrapping -> optimizer -> resume ->
logger -> Trainer.fit -> loss plot, final sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab import parallel
from gpt2lab.checkpoint import (
    CONFIG_FILE,
    check_same_architecture,
    check_writable,
    checkpoint_problem,
    find_latest,
    intact_checkpoints,
    is_checkpoint,
    list_checkpoints,
    load_sharded,
    model_state_for_save,
    prune_checkpoints,
    read_config,
    save_sharded,
    step_dir,
)
from gpt2lab.config import RESULT_CHANGING, ModelConfig, RunConfig, to_dict, to_yaml
from gpt2lab.console import say
from gpt2lab.dtype_choice import MuonIterations, TrainingSteps, resolve
from gpt2lab.errors import UserError
from gpt2lab.evaluate.training import task_schedule
from gpt2lab.fileio import LOCK_FILE, RESOLVED_CONFIG_FILE, RunLock, write_atomic
from gpt2lab.metrics import METRICS_FILE, PLOT_FILE, RunLogger, plot_run, truncate_metrics
from gpt2lab.model import GPT, PRESETS, GPTConfig, check_memory, describe_size, model_stats
from gpt2lab.optim import build_optimizer
from gpt2lab.precision import auto_on_cpu
from gpt2lab.timebudget import Choice, Planner
from gpt2lab.tokenizer import Tokenizer, same_tokenizer, tokenizer_from_dict, tokenizer_label
from gpt2lab.trainer import Hook, Trainer, TrainResult, batch_geometry


def train(cfg: RunConfig, started_at: float | None = None) -> TrainResult:
    """Build everything `cfg` describes and train; returns the trainer's result.

    Rank 0 holds an exclusive lock on the run directory for the whole run (a second run into it is
    refused); a fresh run that fails before writing anything leaves no empty run directory behind.
    `started_at` (a time.monotonic() value; default: now) is where train.max_time counts from: the
    command line passes its process's start, so the budget covers the whole command."""
    started_at = time.monotonic() if started_at is None else started_at
    cfg.validate()
    env = parallel.init_distributed(cfg.train.device)
    run_dir = cfg.out_dir
    created = env.is_main and not run_dir.exists()
    try:
        if env.is_main:
            RunLock(run_dir).check_free()  # a live run's directory: say so, whatever else it holds
            resolve_resume(_resume_setting(cfg, env), run_dir, quiet=True)  # refuse before touching run_dir
            check_own_files(cfg)
            check_writable(run_dir)
        with RunLock(run_dir) if env.is_main else contextlib.nullcontext():
            return _train(cfg, env, started_at)
    except BaseException:
        if created:
            _remove_if_unused(run_dir)
        raise
    finally:
        parallel.destroy()


def _resume_setting(cfg: RunConfig, env: Any) -> bool | str:
    """checkpoint.resume, except that a run restarted by torchrun (--max-restarts) after a failure
    continues from its newest checkpoint."""
    return True if env.restart_count > 0 and list_checkpoints(cfg.out_dir) else cfg.checkpoint.resume


RESOLVED_CONFIG_HEADER = ("# gpt2lab: the config this run used, with every default filled in. gpt2lab rewrites "
                          "this file; copy it elsewhere to edit it.\n")


def write_resolved_config(cfg: RunConfig) -> None:
    """<out_dir>/resolved_config.yaml: the config as the run uses it, marked as gpt2lab's by its first line."""
    write_atomic(cfg.out_dir / RESOLVED_CONFIG_FILE, RESOLVED_CONFIG_HEADER + to_yaml(cfg))


def check_own_files(cfg: RunConfig) -> None:
    """Refuse, before any work, a run directory holding a file of the user's under a name the run
    writes (the resolved config, metrics.jsonl, loss.png, a LoRA run's adapter/ and merged/): gpt2lab
    never replaces, or appends to, a file it did not write. A `config.yaml` there is never touched."""
    run_dir = cfg.out_dir
    written = {RESOLVED_CONFIG_FILE: _is_resolved_config, METRICS_FILE: _is_metrics,
               PLOT_FILE: lambda p: _is_metrics(run_dir / METRICS_FILE)}
    if cfg.lora.r > 0:
        written["adapter"] = _is_adapter
        if cfg.lora.merge:
            written["merged"] = is_checkpoint
    for name, is_ours in written.items():
        path = run_dir / name
        if (path.exists() or path.is_symlink()) and not is_ours(path):
            raise UserError(f"{path} was not written by gpt2lab, and a run writes its own {name} into its "
                            "directory; move the file, or give the run another directory with --out")


def _first_line(path: Path) -> bytes | None:
    """The first line of a regular file (at most 4 KB of it), None for anything else."""
    if not path.is_file() or path.is_symlink():
        return None
    with open(path, "rb") as f:
        return f.readline(4096)


def _is_resolved_config(path: Path) -> bool:
    return _first_line(path) == RESOLVED_CONFIG_HEADER.encode()


def _is_metrics(path: Path) -> bool:
    """A metrics.jsonl gpt2lab wrote: empty, or its first line one of its events (torn by a crash or not)."""
    line = _first_line(path)
    return line is not None and (not line.strip() or line.startswith(b'{"event": "'))


def _is_adapter(path: Path) -> bool:
    from gpt2lab.lora import read_adapter_config

    try:
        read_adapter_config(path)
    except UserError:
        return False
    return True


def _remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory this process created if the run wrote nothing into it but its lock."""
    left = [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []
    if run_dir.is_dir() and not left:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        run_dir.rmdir()


def process_started_at() -> float:
    """When this process started, as a time.monotonic() value (Linux; elsewhere: now)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, since boot
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.monotonic() - max(0.0, since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic()


def _train(cfg: RunConfig, env: Any, started_at: float) -> TrainResult:
    run_dir = cfg.out_dir
    resume_from = resolve_resume(_resume_setting(cfg, env), run_dir)
    eval_schedule = task_schedule(cfg.eval)  # a bad eval section fails before any work
    auto_on_cpu(cfg.train.dtype, env.device)  # so does a bad GPT2LAB_CPU_DTYPE
    if env.device.type == "cuda" and cfg.train.tf32:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; a no-op on older GPUs
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.train.seed)

    # Data identity first: a scratch model takes its vocabulary from it.
    meta = ensure_dataset(cfg, env) if cfg.data.format == "tokens" else None
    check_training_memory(cfg, meta, env)
    model, tokenizer = build_model(cfg.model, meta, env.device)
    block_size = model.config.block_size
    if resume_from is not None:
        saved = read_config(resume_from)
        check_same_architecture(saved["model"], model.config, str(resume_from))
        if saved.get("tokenizer") and not same_tokenizer(saved["tokenizer"], tokenizer):
            raise UserError(f"cannot resume from {resume_from}: it was trained with another tokenizer "
                            f"({tokenizer_label(saved['tokenizer'])}) than the data's ({tokenizer_label(tokenizer.to_dict())})")
    if cfg.lora.r > 0:
        from gpt2lab.lora import apply_lora

        apply_lora(model, cfg.lora)
    # auto on CPU times this model's micro-batch steps where bf16 matmuls are faster (rank 0 decides for
    # every rank); an explicit bf16 or fp16 on CPU is measured too, for a warning when it is the slower.
    steps = TrainingSteps(model, cfg.train.micro_batch_size, block_size, fused_loss=cfg.train.fused_loss)
    resolved = resolve(cfg.train.dtype, env.device, steps, setting="train.dtype", check_explicit=True)
    dtype = resolved.dtype
    if resolved.line:
        say(f"gpt2lab: {resolved.line}")
    ns_dtype = torch.bfloat16
    if cfg.optim.name == "muon":  # its orthogonalisation's dtype, measured on a CPU (rank 0 for every rank)
        muon = resolve(cfg.optim.muon_dtype, env.device, MuonIterations(model.config.n_embd),
                       setting="optim.muon_dtype", check_explicit=True)
        ns_dtype = muon.dtype
        if muon.line:
            say(f"gpt2lab: {muon.line}")

    geometry = batch_geometry(cfg.train.tokens_per_step, cfg.train.micro_batch_size, block_size, env.world_size)
    train_data, val_batches = build_data(cfg, tokenizer, block_size, geometry.global_rows, env)

    pcfg = dataclasses.replace(cfg.parallel, compile_blocks=cfg.train.compile and cfg.parallel.compile_blocks)
    wrapped = parallel.parallelize(model, pcfg, env)
    if env.rank > 0:  # same init weights on every rank, but each rank its own dropout masks
        torch.manual_seed(cfg.train.seed + env.rank)
    optimizer = build_optimizer(parallel.unwrap(wrapped), cfg.optim, env.device.type, muon_dtype=ns_dtype)
    module = torch.compile(wrapped) if cfg.train.compile and not cfg.parallel.compile_blocks else wrapped

    start_step = 0
    resume_state = None
    resume_changes: dict = {}
    if resume_from is not None:
        resume_state = load_sharded(resume_from, wrapped, optimizer)
        start_step = int(resume_state["step"])

    def on_choice(choice: Choice) -> None:  # train.max_time chose the step count: record it, say so
        _record_plan(cfg, planner, run_dir if env.is_main else None)
        _say_choice(cfg, choice, run_dir, logger)

    planner = Planner.for_run(cfg.train.max_time, cfg.train.max_steps, started_at, on_choice=on_choice,
                              resumed=resume_state.get("time_plan") if resume_state is not None else None)
    _record_plan(cfg, planner)  # a resumed plan's count stands for the one given
    if resume_from is not None:
        if planner.resumed == "final":
            say(f"gpt2lab: resume: train.max_steps {planner.max_steps} (chosen for "
                f"train.max_time={planner.max_time} when the run started)")
        resume_changes = check_resume_changes(resume_state.get("config"), cfg, str(resume_from))
        say(f"resuming from {resume_from} (step {start_step})")
    if env.is_main:
        if resume_from is not None:  # reads (and checks) metrics.jsonl before anything is written
            truncate_metrics(run_dir, start_step)
        write_resolved_config(cfg)
    logger = RunLogger(run_dir, cfg.log, total_steps=cfg.train.max_steps, enabled=env.is_main,
                       config=to_dict(cfg), start_step=start_step)
    try:
        n_params = sum(p.numel() for p in parallel.unwrap(wrapped).parameters())
        n_trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        logger.print(
            f"gpt2lab train: {run_dir} | {n_params:,} params ({n_trainable:,} trained) | {env.device} {dtype} | "
            f"{cfg.train.tokens_per_step:,} tokens/step = {geometry.global_rows} rows x {block_size} "
            f"({cfg.train.micro_batch_size} per pass x {geometry.accum} accumulation x {env.world_size} ranks)"
        )
        if start_step >= cfg.train.max_steps:
            logger.print(f"already at step {start_step} of train.max_steps={cfg.train.max_steps}: nothing to train; "
                         "raise --train.max_steps (with --checkpoint.allow_changes true) to continue")
        flops_per_token = model_stats(parallel.unwrap(wrapped).config, seq_len=block_size).flops_per_token_train
        peak = _peak_flops(env.device, dtype)
        trainer = Trainer(
            module, optimizer, train_data, geometry, train=cfg.train, optim=cfg.optim, env=env, logger=logger,
            dtype=dtype, val_batches=val_batches, hooks=_hooks(cfg, wrapped, tokenizer, env, eval_schedule),
            save=_checkpoint_saver(cfg, wrapped, optimizer, tokenizer, run_dir, env),
            checkpoint_every=cfg.checkpoint.every,
            peak_tokens_per_s=peak / flops_per_token if peak else None, start_step=start_step,
            planner=planner,
        )
        if resume_state is not None:
            trainer.load_state_dict(resume_state)
            if resume_changes:
                logger.log("resume", start_step, {"changed": resume_changes})
        result = trainer.fit()
        if cfg.lora.r > 0 and result.stopped_by is None:
            _save_lora_outputs(cfg, wrapped, tokenizer, run_dir, env)
    finally:
        logger.close()
    if env.is_main:
        _finish(run_dir, result)
    return result


def _record_plan(cfg: RunConfig, planner: Planner, run_dir: Path | None = None) -> None:
    """The planner's step count is the run's train.max_steps: in its config, so in every checkpoint, and
    in <run_dir>/resolved_config.yaml when `run_dir` is given."""
    cfg.train.max_steps = planner.max_steps
    if run_dir is not None:
        write_resolved_config(cfg)


def _say_choice(cfg: RunConfig, choice: Choice, run_dir: Path, logger: RunLogger) -> None:
    """Say the first choice of the step count, and a revision the planner finds worth saying."""
    if choice.revised:
        if choice.said is not None:
            logger.print(f"gpt2lab: train.max_time={cfg.train.max_time}: steps now take {choice.step_s * 1e3:.1f} ms; "
                         f"{choice.max_steps} steps fit (was {choice.said})")
        return
    extras = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in choice.costs.items())
    logger.print(f"gpt2lab: train.max_time={cfg.train.max_time}: {choice.max_steps} steps fit "
                 f"({choice.step_s * 1e3:.1f} ms/step measured; each {extras or 'nothing else'}; "
                 f"{choice.remaining_s:.1f} s left of {choice.budget_s:.0f} s); recorded as train.max_steps "
                 f"in {run_dir / RESOLVED_CONFIG_FILE}")


def _peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for MFU (datasheet on known GPUs, a short measurement on CPU)."""
    from gpt2lab.bench import peak_flops

    try:
        return peak_flops(device, dtype)[0]
    except (RuntimeError, UserError):
        return None


def _finish(run_dir: Path, result: TrainResult) -> None:
    try:
        plot = plot_run(run_dir)
    except UserError as e:
        plot = f"(no plot: {e})"
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    head = f"stopped by {result.stopped_by}" if result.stopped_by else "done"
    say(f"{head}: step {result.step} | val loss {val} | checkpoint {result.checkpoint} | plot {plot}")


# --------------------------------------------------------------------------------------------------
# Pieces


def check_resume_changes(saved: dict | None, cfg: RunConfig, source: str) -> dict:
    """The settings that differ from the run being resumed, as {key: [old, new]}: every one is said;
    one that changes the continuation needs checkpoint.allow_changes (UserError otherwise)."""
    from gpt2lab.configparse import flatten_dict

    if not saved:
        return {}
    old, new = flatten_dict(saved), flatten_dict(to_dict(cfg))
    ignore = ("checkpoint.resume", "checkpoint.allow_changes", "checkpoint.out_dir", "name")
    changes = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v and k not in ignore and k in old}
    changing = [k for k in changes if k.startswith(RESULT_CHANGING)]
    shown = "; ".join(f"{k} {changes[k][0]!s} -> {changes[k][1]!s}" for k in changing)
    if changing and not cfg.checkpoint.allow_changes:
        raise UserError(f"resuming {source} with {shown} would change the run (the schedule, the data or the "
                        "numbers); pass --checkpoint.allow_changes true to continue that way, or resume with the "
                        f"run's own settings (its {RESOLVED_CONFIG_FILE})")
    for k, (a, b) in changes.items():
        kind = "changes the continuation" if k in changing else "keeps the continuation exact"
        say(f"gpt2lab: resume: {k} {a!s} -> {b!s} ({kind})")
    return changes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's global seed is 32-bit; train.seed goes up to 2**63-1
    torch.manual_seed(seed)


def resolve_resume(resume: bool | str, run_dir: Path, quiet: bool = False) -> Path | None:
    """The checkpoint to continue from (None = fresh run), after refusing to overwrite a run's checkpoints.
    `quiet`: do not report the damaged checkpoints it skips (a first check, before the lock is taken)."""
    existing = list_checkpoints(run_dir)  # damaged ones too: a fresh run must not write over any of them
    if resume is False:
        if existing:
            raise UserError(
                f"{run_dir} already holds checkpoints (latest {existing[-1].name}); continue that run with "
                "--resume, or start a new one with --out DIR"
            )
        return None
    if resume is True or resume == "auto":
        intact, skipped = intact_checkpoints(run_dir)
        for line in [] if quiet else skipped:  # a truncated or corrupt newest checkpoint: resume from the one before
            say(f"gpt2lab: {line}")
        if intact:
            return intact[-1]
        if skipped:
            raise UserError(f"--resume: no intact checkpoint in {run_dir} ({len(skipped)} damaged, see above)")
        if resume is True:
            raise UserError(f"--resume: {run_dir} has no checkpoint to continue from; drop --resume to start fresh")
        return None
    path = find_latest(resume)
    if path is None:
        raise UserError(f"checkpoint.resume={resume}: no gpt2lab checkpoint there (expected {CONFIG_FILE} "
                        "or checkpoints/step_*/)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"checkpoint.resume={resume}: {problem}")
    return path


def ensure_dataset(cfg: RunConfig, env: Any) -> dict:
    """The dataset's meta; rank 0 runs `prepare` for data.prepare first when data.dir has no meta.json."""
    from gpt2lab.data.prepare import META_FILE, load_meta, prepare

    data_dir = Path(cfg.data.dir)
    if not (data_dir / META_FILE).is_file() and cfg.data.prepare:
        if env.is_main:
            say(f"gpt2lab: preparing '{cfg.data.prepare}' into {data_dir} (first use)")
            prepare(cfg.data.prepare, data_dir, progress=False)
        parallel.barrier()
    return load_meta(data_dir)


def model_config_from(mcfg: ModelConfig, data_vocab_size: int | None) -> GPTConfig:
    """GPTConfig for scratch training: preset < explicit fields; vocab_size defaults to the data's."""
    arch = {f.name: getattr(mcfg, f.name) for f in dataclasses.fields(GPTConfig)}
    values = dict(PRESETS[mcfg.preset]) if mcfg.preset else {}
    values.update({k: v for k, v in arch.items() if v is not None})
    if "vocab_size" not in values and data_vocab_size is not None:
        values["vocab_size"] = data_vocab_size
    return GPTConfig(**values)


def check_training_memory(cfg: RunConfig, meta: dict | None, env: Any) -> None:
    """Refuse, before anything is built, a run whose model, gradients, optimizer state and micro-batch
    activations cannot fit in the memory of its device (`gpt2lab.model.check_memory`)."""
    if cfg.model.init == "scratch":
        if meta is None:
            return  # build_model says what is missing
        config = model_config_from(cfg.model, meta["vocab_size"])
    else:
        from gpt2lab.loading import load_config

        config = load_config(cfg.model.init, flag="--model.init")
    fsdp = cfg.parallel.strategy == "fsdp"
    copies = 0 if cfg.lora.r > 0 else 3 if cfg.optim.name == "adamw" else 2  # gradients + optimizer states
    check_memory(config, env.device, f"training {describe_size(config)}",
                 "choose a smaller model or train.micro_batch_size (or more GPUs with FSDP)",
                 shards=env.world_size if fsdp else 1, train_copies=copies,
                 batch=(cfg.train.micro_batch_size, config.block_size), fused_loss=cfg.train.fused_loss,
                 checkpointing=cfg.parallel.activation_checkpointing != "none")


def build_model(mcfg: ModelConfig, meta: dict | None, device: torch.device) -> tuple[GPT, Tokenizer]:
    """The model to train and its tokenizer; checks that the model can read the data's token ids."""
    data_tok = meta["tokenizer"] if meta is not None else None
    if mcfg.init == "scratch":
        if meta is None:
            raise UserError("model.init=scratch needs a tokenizer from the data; SFT data needs a pretrained "
                            "model.init (e.g. gpt2)")
        config = model_config_from(mcfg, meta["vocab_size"])
        if config.vocab_size < meta["vocab_size"]:
            raise UserError(
                f"model.vocab_size={config.vocab_size} is smaller than the vocabulary of {meta['dir']} "
                f"({meta['vocab_size']} ids, tokenizer {data_tok.get('kind')}); remove model.vocab_size or set it "
                f">= {meta['vocab_size']}"
            )
        model = GPT(config).to(device)
        return model, tokenizer_from_dict(data_tok)
    model, tokenizer = load_init(mcfg.init, device)
    if data_tok is not None and not same_tokenizer(tokenizer, data_tok):
        raise UserError(
            f"model.init={mcfg.init} uses the {tokenizer_label(tokenizer.to_dict())} tokenizer but {meta['dir']} was "
            f"prepared with {tokenizer_label(data_tok)}; prepare the data with the model's tokenizer"
        )
    for f in dataclasses.fields(GPTConfig):
        wanted = getattr(mcfg, f.name)
        if wanted is not None and f.name != "dropout" and wanted != getattr(model.config, f.name):
            raise UserError(
                f"model.{f.name}={wanted!r} conflicts with model.init={mcfg.init} (which has "
                f"{getattr(model.config, f.name)!r}); only model.dropout can change for a pretrained model"
            )
    if mcfg.dropout is not None:
        set_dropout(model, mcfg.dropout)
    return model, tokenizer


def load_init(init: str, device: torch.device) -> tuple[GPT, Tokenizer]:
    """A pretrained model and its tokenizer through gpt2lab.loading (preset name, HF dir, checkpoint)."""
    from gpt2lab.loading import load_model

    return load_model(init, device=device, dtype=torch.float32, flag="--model.init")


def set_dropout(model: GPT, p: float) -> None:
    """Change the dropout probability of a built model (every Dropout module and the attention's)."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p


def validation_rows(train: Any, block_size: int) -> int:
    """Blocks (or SFT records) in the validation set: eval_tokens // block_size, or with the older
    eval_batches, eval_batches x micro_batch_size."""
    if train.eval_batches is not None:
        return train.eval_batches * train.micro_batch_size
    return train.eval_tokens // block_size


def build_data(cfg: RunConfig, tokenizer: Tokenizer, block_size: int, global_rows: int, env: Any):
    """(train data with get_batch(step), a function returning the fixed validation batches or None).

    The validation set is the first `validation_rows` rows of the val split, whatever the micro-batch
    size and world size; it is read in batches of micro_batch_size rows per rank."""
    rows = validation_rows(cfg.train, block_size)
    batch = cfg.train.micro_batch_size * env.world_size
    if cfg.data.format == "sft":
        from gpt2lab.data.sft import build_sft_data

        train_data, val = build_sft_data(cfg.data.sft, tokenizer, block_size, global_rows, env.rank,
                                         env.world_size, cfg.train.seed)
        if val is None or rows == 0:
            return train_data, None
        return train_data, lambda: val.iter_eval_batches(batch, None, env.rank, env.world_size, max_rows=rows)

    from gpt2lab.data.loader import TokenLoader, iter_eval_batches

    device = env.device if env.device.type == "cuda" else "cpu"
    train_data = TokenLoader(cfg.data.dir, "train", block_size=block_size, global_batch_size=global_rows,
                             rank=env.rank, world_size=env.world_size, seed=cfg.train.seed, order=cfg.data.order,
                             device=device, pin_memory=env.device.type == "cuda")
    if rows == 0:
        return train_data, None
    # Fail now, not at the first evaluation, if the val split is shorter than one block.
    next(iter_eval_batches(cfg.data.dir, "val", block_size, batch, rank=env.rank, world_size=env.world_size,
                           max_rows=1))
    return train_data, lambda: iter_eval_batches(cfg.data.dir, "val", block_size, batch, rank=env.rank,
                                                 world_size=env.world_size, device=device, max_rows=rows)


def _chat_extra(cfg: RunConfig) -> dict:
    """{"chat_template": the template a finetuned model learnt} for its checkpoints (chat and sample --chat
    default to it), {} for pretraining."""
    return {"chat_template": cfg.data.sft.template} if cfg.data.format == "sft" else {}


def _checkpoint_saver(cfg: RunConfig, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      tokenizer: Tokenizer, run_dir: Path, env: Any):
    """The trainer's save(step, train_state) -> checkpoint directory: every rank writes its share, then
    rank 0 keeps the newest checkpoint.keep_last."""
    extra = {"run": cfg.name, "init": cfg.model.init, **_chat_extra(cfg)}
    if cfg.lora.r > 0:
        extra["lora"] = to_dict(cfg.lora)  # weights hold lora_A/lora_B: apply_lora before loading them

    def save(step: int, train_state: dict) -> Path:
        path = step_dir(run_dir, step)
        save_sharded(path, wrapped, optimizer, {**train_state, "config": to_dict(cfg)},  # max_time fixes max_steps late
                     model_config=parallel.unwrap(wrapped).config, tokenizer=tokenizer.to_dict(), step=step,
                     extra=extra)
        if env.is_main:
            prune_checkpoints(run_dir, cfg.checkpoint.keep_last)
        parallel.barrier()
        return path

    return save


def _hooks(cfg: RunConfig, wrapped: torch.nn.Module, tokenizer: Tokenizer, env: Any,
           eval_schedule: tuple[list[str], int, int | None]) -> list[Hook]:
    """What the trainer runs between steps, in this order: the sample (train.sample_every, and after the
    last step), then the eval tasks (eval.every; eval_schedule is task_schedule(cfg.eval))."""
    from gpt2lab.evaluate.registry import get_task
    from gpt2lab.evaluate.training import TaskEvaluator

    hooks = []
    if cfg.train.sample_tokens > 0:
        def sample() -> str:
            return sample_text(parallel.unwrap(wrapped), tokenizer, cfg.train.sample_prompt, cfg.train.sample_tokens,
                               cfg.train.sample_temperature, cfg.train.sample_top_k, cfg.train.seed)

        def sample_cost(timed: int = 8) -> float:  # greedy: draws nothing from the RNG
            model = parallel.unwrap(wrapped)
            was_training = model.training
            t0 = time.perf_counter()
            sample_text(model, tokenizer, cfg.train.sample_prompt, timed, 0.0, None, cfg.train.seed)
            model.train(was_training)
            return (time.perf_counter() - t0) / timed * cfg.train.sample_tokens

        hooks.append(Hook("sample", cfg.train.sample_every, sample, at_end=True, cost=sample_cost))
    tasks, every, limit = eval_schedule
    if tasks:
        evaluator = TaskEvaluator([get_task(t) for t in tasks], limit, wrapped, tokenizer, env)
        hooks.append(Hook("eval", every, evaluator, cost=evaluator.estimate_seconds))
    return hooks


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int | None, seed: int) -> str:
    """Prompt + a sampled continuation (KV-cached generation, reproducible for a seed; the context of a
    learned-position model slides past block_size as `gpt2lab.sampling.stream` describes)."""
    from gpt2lab.sampling import generate

    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:  # generation needs at least one token to condition on
        ids = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    top_k = min(top_k, model.config.vocab_size) if top_k else None
    new = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   tokenizer=tokenizer)[0]
    return prompt + tokenizer.decode(new)


def _save_lora_outputs(cfg: RunConfig, wrapped: torch.nn.Module, tokenizer: Tokenizer, run_dir: Path,
                       env: Any) -> None:
    """LoRA runs also leave the adapter alone (<run_dir>/adapter) and, with lora.merge, a plain
    checkpoint of the merged model (<run_dir>/merged) that any command loads."""
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.lora import apply_lora, merge_lora, save_adapter

    model = parallel.unwrap(wrapped)
    state = model_state_for_save(wrapped)  # collective under FSDP
    if not env.is_main:
        return
    save_adapter(run_dir / "adapter", model, cfg.lora, cfg.model.init, tokenizer=tokenizer.to_dict(),
                 extra=_chat_extra(cfg))
    if cfg.lora.merge:
        plain = apply_lora(GPT(model.config), cfg.lora)  # a CPU copy: the trained model may be sharded
        plain.load_state_dict(state, strict=False)  # strict=False: the tied lm_head.weight is stored once
        merge_lora(plain)
        save_checkpoint(run_dir / "merged", plain, plain.config, tokenizer.to_dict(),
                        extra={"init": cfg.model.init, **_chat_extra(cfg)})
