"""The training loop shared by every drafter: AdamW, warmup then linear decay, checkpoints that
resume to the same weights, a progress bar with loss and speed.

Everything that decides a step is a function of the step number and the seed (the batch order is
a seeded permutation per epoch, the learning rate a schedule of the step), so a run resumed from
a checkpoint computes exactly what the uninterrupted run would have.

Checkpoints are safetensors (``checkpoint.safetensors`` in the output folder): the parameters,
AdamW's moments and step counts, and in the metadata the step reached and the run's settings;
resuming with other settings is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError

CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """The settings a run's steps depend on (a resumed run must have the same)."""

    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 50
    batch: int = 4  # windows per step
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 10% at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (1.0 - 0.9 * (step - cfg.warmup) / span)


def batch_indices(cfg: TrainConfig, n: int, step: int) -> Tensor:
    """The windows of step ``step``: consecutive slices of a per-epoch seeded permutation."""
    per_epoch = max(1, n // cfg.batch)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    b = min(cfg.batch, n)
    return perm[i * b : (i + 1) * b]


def _save(path: Path, net: nn.Module, opt: torch.optim.Optimizer, step: int, meta: dict) -> None:
    from ..diskcache import save_tensors

    # trained parameters only: frozen ones (a draft model's embedding) come back from the init
    trained = {k for k, p in net.named_parameters() if p.requires_grad}
    tensors = {f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items() if k in trained}
    names = {id(p): k for k, p in net.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            for key, val in st.items():
                tensors[f"opt.{names[id(p)]}.{key}"] = torch.as_tensor(val).detach().clone().contiguous()
    save_tensors(path, tensors, metadata={"step": str(step), "run": json.dumps(meta, sort_keys=True)})


def _load(path: Path, net: nn.Module, opt: torch.optim.Optimizer, meta: dict) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            md = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path} ({e}); pass --fresh to start over") from None
    if json.loads(md.get("run", "{}")) != json.loads(json.dumps(meta, sort_keys=True)):
        raise ConfigError(
            f"the checkpoint in {path.parent} is from a run with other settings: rerun with the "
            "same options to resume, or pass --fresh to start over"
        )
    missing = net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")},
                                  strict=False).missing_keys
    frozen = {k for k, p in net.named_parameters() if not p.requires_grad}
    if set(missing) - frozen - {k for k, _ in net.named_buffers()}:
        raise ConfigError(f"the checkpoint in {path.parent} lacks trained weights; pass --fresh")
    params = dict(net.named_parameters())
    for k, v in tensors.items():
        if k.startswith("opt."):
            name, key = k[4:].rsplit(".", 1)
            opt.state[params[name]][key] = v
    return int(md.get("step", "0"))


def train(
    net: nn.Module,
    loss_fn: Callable[[Tensor, int], tuple[Tensor, dict]],
    n_windows: int,
    cfg: TrainConfig,
    out: Path,
    meta: dict,
    resume: bool = True,
    progress: bool = True,
    tokens_per_window: int = 0,
    stop_after: int | None = None,
    desc: str = "training",
) -> dict:
    """Train ``net`` for ``cfg.steps`` steps; ``loss_fn(window_indices, step) -> (loss, logs)``.

    Resumes from ``out/checkpoint.safetensors`` when ``resume`` and it exists. ``stop_after``:
    stop (with a checkpoint) after that many steps in total, as an interruption would.
    ``desc``: the progress bar's label. Returns the last logs (floats)."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, **asdict(cfg)}
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    ckpt = out / CHECKPOINT
    start = _load(ckpt, net, opt, meta) if (resume and ckpt.exists()) else 0
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    logs: dict = {}
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", disable=not progress,
               dynamic_ncols=True)
    t0, done_tokens = time.perf_counter(), 0
    ema = None
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        idx = batch_indices(cfg, n_windows, step)
        loss, logs = loss_fn(idx, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        v = float(loss.detach())
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        done_tokens += len(idx) * tokens_per_window
        rate = done_tokens / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{rate:.0f}", **{k: f"{x:.3f}" for k, x in logs.items()})
        bar.update(1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            _save(ckpt, net, opt, step + 1, meta)
    bar.close()
    logs = {"loss": ema if ema is not None else float("nan"), **logs}
    return logs
