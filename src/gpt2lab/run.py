"""The one place that builds a training run from a RunConfig (used by `gpt2lab train` and `finetune`).

    from gpt2lab.config import load_config
    from gpt2lab.run import train
    result = train(load_config("quickstart", ["--train.max_steps", "100"]))

Order: process group -> run directory checks (before any work) -> data (prepared on first use) ->
model (scratch, preset or pretrained `init`) -> LoRA -> parallel wrapping -> optimizer -> resume ->
logger -> Trainer.fit -> loss plot, final sample.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab import parallel
from gpt2lab.checkpoint import (
    CONFIG_FILE,
    check_same_architecture,
    check_writable,
    find_latest,
    list_checkpoints,
    read_config,
)
from gpt2lab.config import ModelConfig, RunConfig, save_yaml, to_dict
from gpt2lab.errors import UserError
from gpt2lab.logging import RunLogger, plot_run, truncate_metrics
from gpt2lab.model import GPT, PRESETS, GPTConfig, model_stats
from gpt2lab.optim import build_optimizer
from gpt2lab.tokenizer import Tokenizer, same_tokenizer, tokenizer_from_dict
from gpt2lab.trainer import Trainer, TrainerParts, TrainResult, batch_geometry

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def train(cfg: RunConfig) -> TrainResult:
    """Build everything `cfg` describes and train; returns the trainer's result."""
    cfg.validate()
    env = parallel.init_distributed(cfg.train.device)
    try:
        return _train(cfg, env)
    finally:
        parallel.destroy()


def _say(env: Any, message: str) -> None:
    if env.is_main:
        print(message, file=sys.stderr, flush=True)


def _train(cfg: RunConfig, env: Any) -> TrainResult:
    run_dir = cfg.out_dir
    if env.is_main:
        check_writable(run_dir)
    # Restarted by torchrun (--max-restarts) after a failure: continue from the run's newest checkpoint.
    resume = True if env.restart_count > 0 and list_checkpoints(run_dir) else cfg.checkpoint.resume
    resume_from = resolve_resume(resume, run_dir)
    dtype = resolve_dtype(cfg.train.dtype, env.device)
    if env.device.type == "cuda" and cfg.train.tf32:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; a no-op on older GPUs
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.train.seed)

    # Data identity first: a scratch model takes its vocabulary from it.
    meta = ensure_dataset(cfg, env) if cfg.data.format == "tokens" else None
    model, tokenizer = build_model(cfg.model, meta, env.device)
    block_size = model.config.block_size
    if resume_from is not None:
        saved = read_config(resume_from)
        check_same_architecture(saved["model"], model.config, str(resume_from))
        if saved.get("tokenizer") and not same_tokenizer(saved["tokenizer"], tokenizer):
            raise UserError(f"cannot resume from {resume_from}: it was trained with another tokenizer "
                            f"({saved['tokenizer'].get('kind')}) than the data's ({tokenizer.to_dict().get('kind')})")
    if cfg.lora.r > 0:
        from gpt2lab.lora import apply_lora

        apply_lora(model, cfg.lora)

    global_rows, accum = batch_geometry(cfg.train.tokens_per_step, cfg.train.micro_batch_size, block_size,
                                        env.world_size)
    train_data, eval_batches = build_data(cfg, tokenizer, block_size, global_rows, env)

    pcfg = dataclasses.replace(cfg.parallel, compile_blocks=cfg.train.compile and cfg.parallel.compile_blocks)
    wrapped = parallel.parallelize(model, pcfg, env)
    if env.rank > 0:  # same init weights on every rank, but each rank its own dropout masks
        torch.manual_seed(cfg.train.seed + env.rank)
    optimizer = build_optimizer(parallel.unwrap(wrapped), cfg.optim, env.device.type)
    scaler = torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16)
    module = torch.compile(wrapped) if cfg.train.compile and not cfg.parallel.compile_blocks else wrapped

    start_step = 0
    resume_state = None
    if resume_from is not None:
        resume_state = parallel.load_sharded(resume_from, wrapped, optimizer)
        start_step = int(resume_state["step"])
        _say(env, f"resuming from {resume_from} (step {start_step})")
    if env.is_main:
        save_yaml(cfg, run_dir / "config.yaml")
        if resume_from is not None:
            truncate_metrics(run_dir, start_step)
    logger = RunLogger(run_dir, cfg.log, total_steps=cfg.train.max_steps, enabled=env.is_main,
                       config=to_dict(cfg), start_step=start_step)
    try:
        n_params = sum(p.numel() for p in parallel.unwrap(wrapped).parameters())
        n_trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        logger.print(
            f"gpt2lab train: {run_dir} | {n_params:,} params ({n_trainable:,} trained) | {env.device} {dtype} | "
            f"{cfg.train.tokens_per_step:,} tokens/step = {global_rows} rows x {block_size} "
            f"({cfg.train.micro_batch_size} per pass x {accum} accumulation x {env.world_size} ranks)"
        )
        parts = TrainerParts(
            train=cfg.train, optim=cfg.optim, env=env, logger=logger, run_dir=run_dir, block_size=block_size,
            dtype=dtype, scaler=scaler, eval_batches=eval_batches,
            checkpoint_every=cfg.checkpoint.every, keep_last=cfg.checkpoint.keep_last,
            save_checkpoint=_checkpoint_saver(cfg, wrapped, optimizer, tokenizer),
            sample=_sampler(cfg, wrapped, tokenizer) if cfg.train.sample_tokens > 0 else None,
            hellaswag=_hellaswag(cfg, wrapped, tokenizer, env), hellaswag_every=cfg.eval.hellaswag_every,
            flops_per_token=model_stats(parallel.unwrap(wrapped).config, seq_len=block_size).flops_per_token_train,
            peak_flops=_peak_flops(env.device, dtype),
        )
        if start_step >= cfg.train.max_steps:
            logger.print(f"already at step {start_step} of train.max_steps={cfg.train.max_steps}: nothing to train; "
                         "raise --train.max_steps to continue")
        trainer = Trainer(module, optimizer, train_data, parts, start_step=start_step)
        if resume_state is not None:
            trainer.load_state_dict(resume_state)
        result = trainer.fit()
        if cfg.lora.r > 0 and result.stopped_by is None:
            _save_lora_outputs(cfg, wrapped, tokenizer, run_dir, env)
    finally:
        logger.close()
    if env.is_main:
        _finish(run_dir, result)
    return result


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
    print(f"{head}: step {result.step} | val loss {val} | checkpoint {result.checkpoint} | plot {plot}",
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Pieces


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for train.dtype on `device`: auto = bf16 on CUDA with bf16 support, fp16
    (with loss scaling) on older CUDA GPUs, fp32 elsewhere (bf16 autocast on CPU is far slower)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name != "fp32" and device.type == "cpu":
        print(f"gpt2lab: warning: train.dtype={name} on CPU is usually much slower than fp32", file=sys.stderr)
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_resume(resume: bool | str, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (None = fresh run), after refusing to overwrite a run's checkpoints."""
    existing = list_checkpoints(run_dir)
    if resume is False:
        if existing:
            raise UserError(
                f"{run_dir} already holds checkpoints (latest {existing[-1].name}); continue that run with "
                "--resume, or start a new one with --out DIR"
            )
        return None
    if resume is True or resume == "auto":
        if existing:
            return existing[-1]
        if resume is True:
            raise UserError(f"--resume: {run_dir} has no checkpoint to continue from; drop --resume to start fresh")
        return None
    path = find_latest(resume)
    if path is None:
        raise UserError(f"checkpoint.resume={resume}: no gpt2lab checkpoint there (expected {CONFIG_FILE} "
                        "or checkpoints/step_*/)")
    return path


def ensure_dataset(cfg: RunConfig, env: Any) -> dict:
    """The dataset's meta; rank 0 runs `prepare` for data.prepare first when data.dir has no meta.json."""
    from gpt2lab.data.prepare import META_FILE, load_meta, prepare

    data_dir = Path(cfg.data.dir)
    if not (data_dir / META_FILE).is_file() and cfg.data.prepare:
        if env.is_main:
            print(f"gpt2lab: preparing '{cfg.data.prepare}' into {data_dir} (first use)", file=sys.stderr, flush=True)
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
            f"model.init={mcfg.init} uses the {tokenizer.to_dict().get('kind')} tokenizer but {meta['dir']} was "
            f"prepared with {data_tok.get('kind')}; prepare the data with the model's tokenizer"
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
    try:
        from gpt2lab.loading import load_model
    except ImportError:  # loading.py not available: gpt2lab checkpoints still load
        from gpt2lab.checkpoint import load_checkpoint

        model, config = load_checkpoint(init, device)
        return model, tokenizer_from_dict(config["tokenizer"])
    model, tokenizer = load_model(init, device=device, dtype=torch.float32)
    return model, tokenizer


def set_dropout(model: GPT, p: float) -> None:
    """Change the dropout probability of a built model (every Dropout module and the attention's)."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p


def build_data(cfg: RunConfig, tokenizer: Tokenizer, block_size: int, global_rows: int, env: Any):
    """(train data with get_batch(step), a function returning the fixed validation batches or None)."""
    mbs, n_eval = cfg.train.micro_batch_size, cfg.train.eval_batches
    # The validation set is eval_batches micro-batches in all, whatever the world size: ranks split
    # each global batch of mbs * world rows, so there are eval_batches / world of them (rounded up).
    n_eval = -(-n_eval // env.world_size)
    if cfg.data.format == "sft":
        from gpt2lab.data.sft import build_sft_data

        train_data, val = build_sft_data(cfg.data, tokenizer, block_size, global_rows, env.rank,
                                         env.world_size, cfg.train.seed)
        if val is None or n_eval == 0:
            return train_data, None
        return train_data, lambda: val.iter_eval_batches(mbs * env.world_size, n_eval, env.rank, env.world_size)

    from gpt2lab.data.loader import TokenLoader, iter_eval_batches

    device = env.device if env.device.type == "cuda" else "cpu"
    train_data = TokenLoader(cfg.data.dir, "train", block_size=block_size, global_batch_size=global_rows,
                             rank=env.rank, world_size=env.world_size, seed=cfg.train.seed, order=cfg.data.order,
                             device=device, pin_memory=env.device.type == "cuda")
    if n_eval == 0:
        return train_data, None
    # Fail now, not at the first evaluation, if the val split is shorter than one block.
    next(iter_eval_batches(cfg.data.dir, "val", block_size, mbs * env.world_size, 1, env.rank, env.world_size))
    return train_data, lambda: iter_eval_batches(cfg.data.dir, "val", block_size, mbs * env.world_size, n_eval,
                                                 env.rank, env.world_size, device)


def _checkpoint_saver(cfg: RunConfig, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      tokenizer: Tokenizer):
    config_dict = to_dict(cfg)
    extra = {"run": cfg.name, "init": cfg.model.init}
    if cfg.lora.r > 0:
        extra["lora"] = to_dict(cfg.lora)  # weights hold lora_A/lora_B: apply_lora before loading them

    def save(path: Path, step: int, train_state: dict) -> None:
        parallel.save_sharded(path, wrapped, optimizer, {**train_state, "config": config_dict},
                              model_config=parallel.unwrap(wrapped).config, tokenizer=tokenizer.to_dict(),
                              step=step, extra=extra)

    return save


def _sampler(cfg: RunConfig, wrapped: torch.nn.Module, tokenizer: Tokenizer):
    def sample() -> str:
        return sample_text(parallel.unwrap(wrapped), tokenizer, cfg.train.sample_prompt, cfg.train.sample_tokens,
                           cfg.train.sample_temperature, cfg.train.sample_top_k, cfg.train.seed)

    return sample


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int | None, seed: int) -> str:
    """Prompt + a sampled continuation (KV-cached generation, reproducible for a seed; the context of a
    learned-position model slides past block_size as `gpt2lab.generate.stream` describes)."""
    from gpt2lab.generate import generate

    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:  # generation needs at least one token to condition on
        ids = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    top_k = min(top_k, model.config.vocab_size) if top_k else None
    new = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   tokenizer=tokenizer)[0]
    return prompt + tokenizer.decode(new)


def _hellaswag(cfg: RunConfig, wrapped: torch.nn.Module, tokenizer: Tokenizer, env: Any):
    if cfg.eval.hellaswag_every <= 0:
        return None
    try:
        from gpt2lab.evaluate.hellaswag import in_training_eval
    except ImportError:
        _say(env, "gpt2lab: eval.hellaswag_every is set but gpt2lab.evaluate.hellaswag is unavailable; skipping")
        return None
    return lambda: in_training_eval(wrapped, tokenizer, cfg.eval.hellaswag_limit, env)


def _save_lora_outputs(cfg: RunConfig, wrapped: torch.nn.Module, tokenizer: Tokenizer, run_dir: Path,
                       env: Any) -> None:
    """LoRA runs also leave the adapter alone (<run_dir>/adapter) and, with lora.merge, a plain
    checkpoint of the merged model (<run_dir>/merged) that any command loads."""
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.lora import apply_lora, merge_lora, save_adapter

    model = parallel.unwrap(wrapped)
    state = parallel.model_state_for_save(wrapped)  # collective under FSDP
    if not env.is_main:
        return
    save_adapter(run_dir / "adapter", model, cfg.lora, cfg.model.init, tokenizer=tokenizer.to_dict())
    if cfg.lora.merge:
        plain = apply_lora(GPT(model.config), cfg.lora)  # a CPU copy: the trained model may be sharded
        plain.load_state_dict(state, strict=False)  # strict=False: the tied lm_head.weight is stored once
        merge_lora(plain)
        save_checkpoint(run_dir / "merged", plain, plain.config, tokenizer.to_dict(), extra={"init": cfg.model.init})
