"""The distillation run that ``main_distill.py`` starts: one process, or many under ``torchrun``.

Setup loads everything that can be wrong (config, teacher / SinSR / VQ files, training images,
quant names) before the first step, so a bad run fails in seconds with a named error. The loop
follows docs/pipeline.md §5; where this implementation does better than the original is said in
docs/cli.md §4 and docs/faults.md (exact resume, atomic checkpoints, EMA kept across resumes, NaN guard,
signal-safe saves). The shutdown order (threads, writers, lock, barrier, process group, exit) is
:func:`train`'s.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from bimacosr import build
from bimacosr.checkpoint import CheckpointError, load_state_dict_into
from bimacosr.config import ConfigError, load_config, require
from bimacosr.data.datasets import build_train_dataset, build_val_dataset
from bimacosr.data.degradation import degrade
from bimacosr.train import state
from bimacosr.train.batches import BatchPlan, EpochIndexed, PairPool, PlanSampler, TrainingDataError, chunk_seed
from bimacosr.train.distill import distill_loss, ema_update, lr_at
from bimacosr.train.group import Dist, PeerFailed, init_distributed
from bimacosr.train.logs import RunLogger
from bimacosr.train.parentwatch import stop_if_orphaned, watch_parent
from bimacosr.train.runlock import RunLock, RunLockedError
from bimacosr.train.validate import validate


@dataclass
class TrainOptions:
    """The command line of ``main_distill.py``."""

    cfg_path: Path
    save_dir: Path
    resume: str | None = None
    steps: int | None = None
    iterations: int | None = None
    debug: bool = False


class Trainer:
    """Holds the models, optimizer, EMA and data of a run; ``fit()`` trains to the end."""

    def __init__(self, opts: TrainOptions, env: Dist, cfg: DictConfig | None = None):
        self.opts, self.env = opts, env
        cfg = cfg if cfg is not None else load_config(opts.cfg_path)
        if opts.steps:
            cfg.diffusion.params.steps = opts.steps
        require(cfg, "model.params", "model_teacher.params", "model.teacher_ckpt_path", "autoencoder.params",
                "autoencoder.ckpt_path", "diffusion.params", "degradation", "data.train", source=str(opts.cfg_path))
        self.cfg, self.tcfg = cfg, cfg.train
        self.run_dir = Path(opts.save_dir)
        resume = state.load_resume(self.run_dir, opts.resume)  # read (falling back) before building models
        self.seed = int(self.tcfg.seed)
        self.iterations = int(opts.iterations or self.tcfg.iterations)
        self.base_lr = float(self.tcfg.lr)
        self.milestones = tuple(int(m) for m in self.tcfg.milestones)
        self.schedule = build.build_schedule(cfg, env.device)
        self.sf = self.schedule.sf
        self.train_set = build_train_dataset(cfg.data.train, seed=self.seed)
        self.val_set = build_val_dataset(cfg.data.val) if cfg.data.val else None
        batch = self.tcfg.batch
        batch = int(batch[0] if OmegaConf.is_list(batch) else batch)
        self.plan = BatchPlan(len(self.train_set), batch, env.world, env.rank, int(self.tcfg.microbatch or batch),
                              self.seed)
        torch.manual_seed(self.seed)  # same random init on every rank (e.g. BiDM's shortcut convs)
        self.teacher = build.build_teacher(cfg, env.device)
        self.student = student = build.build_student(cfg, env.device)
        self.vq = build.build_autoencoder(cfg, env.device, build.resolve_precision("auto", env.device, cfg).autoencoder_dtype)
        self.model = student  # wrapped by DistributedDataParallel in fit(): no collective while setting up
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=self.base_lr,
                                           weight_decay=float(self.tcfg.weight_decay))
        self.ema = {k: v.detach().clone() for k, v in student.state_dict().items()}
        self.ema_rate = float(self.tcfg.ema_rate)
        queue = self.tcfg.queue_size
        self.pool = PairPool(int(10 * self.plan.per_rank if queue is None else queue))
        self.amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            "fp16" if self.tcfg.use_fp16 else str(self.tcfg.amp))
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp is torch.float16)
        self.grad_clip = self.tcfg.grad_clip
        self.step, self.best_psnr = 0, float("-inf")
        self.stop_signal: int | None = None
        self._resume(*resume)
        self.saved_step = self.step
        self.logger = RunLogger(self.run_dir, self.step, enabled=env.main)

    def _resume(self, found: state.Checkpoint | None, skipped: list[str]) -> None:
        """Apply the checkpoint read by :func:`state.load_resume` (plain ``--resume``: the newest
        that reads completely), saying which newer ones were skipped and why."""
        if self.env.main:
            for line in skipped:
                print(f"warning: {line}", file=sys.stderr)
        if found is None:
            return
        folder, ema, saved = found.folder, found.ema, found.trainer
        if skipped and self.env.main:
            print(f"resuming from {folder}", file=sys.stderr)
        load_state_dict_into(self.student, found.model, what="resumed student", path=folder / "model.pth")
        missing = sorted(set(self.ema) - set(ema))
        if missing:
            raise CheckpointError(f"{folder / 'ema.pth'} lacks {len(missing)} EMA entries, e.g. {missing[:3]}")
        self.ema = {k: ema[k].to(v.device, v.dtype) for k, v in self.ema.items()}
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.step, self.best_psnr = int(saved["step"]), float(saved["best_psnr"])
        pools = saved["pools"]
        if len(pools) != self.env.world:
            raise ConfigError(f"{folder} was saved by {len(pools)} process(es); resume it with the same number")
        self.pool.load_state_dict(pools[self.env.rank], self.env.device)

    def _loader(self) -> DataLoader:
        workers = int(self.tcfg.num_workers)
        return DataLoader(EpochIndexed(self.train_set), batch_sampler=PlanSampler(self.plan, self.step + 1, self.iterations),
                          num_workers=workers, pin_memory=self.env.device.type == "cuda",
                          prefetch_factor=int(self.tcfg.prefetch_factor) if workers else None)

    def _prepare(self, batch: dict, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Degrade this rank's HR batch (chunk-seeded), pass it through the pool, cut micro-batches
        and draw each one's prior noise: ``[(lq [b,3,h,w] in [-1,1], noise [b,3,h,w])]``."""
        dev, mb = self.env.device, self.plan.microbatch
        lqs, gts = [], []
        for m, chunk in enumerate(self.plan.chunks()):
            seed = chunk_seed(self.seed, step, chunk)
            part = {k: v[m * mb: (m + 1) * mb].to(dev, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
            generator = torch.Generator(dev).manual_seed(seed)
            lq = degrade(part["gt"], part["kernel1"], part["kernel2"], part["sinc_kernel"], self.cfg.degradation,
                         generator=generator, rng=random.Random(seed))
            lqs.append(lq * 2 - 1)
            gts.append(part["gt"] * 2 - 1)
        pool_gen = torch.Generator(dev).manual_seed(chunk_seed(self.seed, step, -1 - self.env.rank))
        lq, _ = self.pool(torch.cat(lqs), torch.cat(gts), pool_gen)
        out = []
        for m, chunk in enumerate(self.plan.chunks()):
            part = lq[m * mb: (m + 1) * mb].contiguous()  # NCHW whatever the JPEG step left: same kernels everywhere
            gen = torch.Generator(dev).manual_seed(chunk_seed(self.seed, step, chunk) + 1)
            out.append((part, torch.randn(part.shape, generator=gen, device=dev)))
        return out

    def train_step(self, batch: dict, step: int) -> float:
        """One optimizer step on this rank's share; returns the mean loss over all ranks."""
        lr = lr_at(step, self.base_lr, self.milestones)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = self._prepare(batch, step)
        total = torch.zeros((), device=self.env.device)
        for i, (lq, noise) in enumerate(micro):
            sync = i == len(micro) - 1 or self.env.world == 1
            ctx = self.model.no_sync() if not sync else torch.enable_grad()
            with ctx, torch.autocast(self.env.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                loss, _ = distill_loss(self.model, self.teacher, self.vq, self.schedule, lq, noise, sf=self.sf)
            if self.env.any(not torch.isfinite(loss).item()):
                raise FloatingPointError(
                    f"non-finite loss ({loss.item()}) at step {step}: the step was not applied, the weights "
                    f"are unchanged. Resume from the last checkpoint with a lower train.lr, or check the data.")
            self.scaler.scale(loss / len(micro)).backward()
            total += loss.detach() / len(micro)
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), float(self.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.env.main:
            ema_update(self.ema, self.student.state_dict(), self.ema_rate)
        if self.env.world > 1:
            dist.all_reduce(total)
            total /= self.env.world
        return total.item()

    def weights_checksum(self) -> float:
        """A float64 fingerprint of the student's weights (equal on every rank while in sync)."""
        with torch.no_grad():
            return float(sum((p.double() * (1 + torch.arange(p.numel(), device=p.device).view_as(p) % 7)).sum()
                             for p in self.student.parameters()))

    def save(self) -> Path | None:
        """Checkpoint the current step (all ranks take part; rank 0 writes). Refuses to save when
        the ranks' weights have diverged."""
        pools, checksums = [self.pool.state_dict()], [self.weights_checksum()]
        if self.env.world > 1:
            pools, checksums = [None] * self.env.world, [None] * self.env.world
            dist.all_gather_object(pools, self.pool.state_dict())
            dist.all_gather_object(checksums, self.weights_checksum())
            if len(set(checksums)) != 1:
                raise RuntimeError(f"the student's weights differ between ranks at step {self.step} "
                                   f"(checksums {checksums}); not saving a diverged model")
        path = None
        with self.env.together():  # a failed write (disk full) stops every rank, not just rank 0
            if self.env.main:
                trainer = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                           "best_psnr": self.best_psnr, "pools": pools, "replica_checksums": checksums,
                           "config": OmegaConf.to_yaml(self.cfg)}
                path = state.save_checkpoint(self.run_dir, self.step, self.student.state_dict(), self.ema,
                                             trainer, keep_last=int(self.tcfg.keep_last))
        self.saved_step = self.step
        return path

    def _on_signal(self, signum: int, _frame) -> None:
        self.stop_signal = signum

    def _next_batch(self, batches: Iterator[dict]) -> dict:
        """The next batch on every rank, or the same error on every rank (an unreadable training
        image on any of them), after saving the steps done since the last checkpoint; the error
        then says how to go on (:meth:`_how_to_continue`)."""
        try:
            with self.env.together():
                return next(batches)
        except Exception as exc:
            if self.step > self.saved_step:
                path = self.save()
                if self.env.main:
                    tqdm.write(f"checkpoint saved: {path}", file=sys.stderr)
            if isinstance(exc, (TrainingDataError, PeerFailed)):  # the same error, with what to do next
                raise type(exc)(f"{exc}, then {self._how_to_continue()}") from exc
            raise

    def _how_to_continue(self) -> str:
        """After fixing the cause: ``--resume`` once the run folder holds a checkpoint, else the
        same command again (``--resume`` would find nothing to continue)."""
        if state.list_checkpoints(self.run_dir):
            return "continue with --resume"
        return "run the same command again (no checkpoint was saved yet, so without --resume)"

    def fit(self) -> int:
        """Train from ``self.step`` to ``iterations``; returns the process exit status. Returning
        or raising, the progress bar and the TensorBoard writer are closed first (their threads
        joined, the events flushed): step 1 of the shutdown order in :func:`train`."""
        if self.env.world > 1:
            self.model = DistributedDataParallel(
                self.student, device_ids=[self.env.device] if self.env.device.type == "cuda" else None,
                find_unused_parameters=True, forward_sync_buffers=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        start, tic = self.step, time.perf_counter()
        try:
            if self.env.main:
                OmegaConf.save(self.cfg, self.run_dir / "config.yaml")
                print(self._start_line(), flush=True)
                if self.amp is torch.bfloat16 and (note := build.emulated_bf16_note(self.env.device)):
                    print(f"note: train.amp bf16: {note}", flush=True)
            with tqdm(total=self.iterations, initial=self.step, desc="distill", unit="it",
                      disable=not self.env.main, dynamic_ncols=True) as bar:  # closed before any error line
                stopped = self._train(bar)
        finally:
            self.logger.close()
        if stopped and self.env.main:
            print(f"stopped by signal at step {self.step}; continue with --resume")
        elif self.env.main:
            print(self._end_line(self.step - start, time.perf_counter() - tic), flush=True)
        return 0

    def _start_line(self) -> str:
        """What this run does: folder, processes, batch, steps (and where it resumes)."""
        plan = self.plan
        where = f"from step {self.step} to {self.iterations}" if self.step else f"{self.iterations} steps"
        return (f"training {where} in {self.run_dir}: {self.env.world} process(es) on {self.env.device.type}, "
                f"batch {plan.global_batch} ({plan.per_rank} per process), {len(self.train_set)} training images")

    def _end_line(self, steps: int, seconds: float) -> str:
        """What the run left: its last checkpoint, the best one by validation PSNR, the time."""
        line = f"done: {steps} step(s) in {seconds:.1f} s; last checkpoint {state.checkpoint_dir(self.run_dir, self.step)}"
        if self.best_psnr > float("-inf"):
            line += f"; best by validation PSNR ({self.best_psnr:.2f} dB): {self.run_dir / 'checkpoints' / 'best_psnr'}"
        return line

    def _train(self, bar: tqdm) -> bool:
        """The steps up to ``iterations``; True when a signal stopped them (after a save)."""
        log_every, save_every = int(self.tcfg.log_freq[0]), int(self.tcfg.save_freq)
        val_every = int(self.tcfg.val_freq)
        tic, first = time.perf_counter(), self.step
        batches = iter(self._loader())
        for _ in range(self.iterations - self.step):
            batch = self._next_batch(batches)
            self.step += 1
            loss = self.train_step(batch, self.step)
            lr = self.optimizer.param_groups[0]["lr"]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}")
            if self.step % log_every == 0 or self.step == 1:
                self.logger.train(self.step, loss, lr, (time.perf_counter() - tic) / (self.step - first))
            if val_every and self.val_set is not None and self.step % val_every == 0:
                self._validate()
            last = self.step == self.iterations
            stop = self.env.any(self.stop_signal is not None)
            if last or stop or self.step % save_every == 0:
                path = self.save()
                if self.env.main and (stop or last):
                    tqdm.write(f"checkpoint saved: {path}")
            if stop:
                return True
        return False

    def _validate(self) -> None:
        with self.env.together():  # rank 0 validates; an unreadable validation pair stops every rank
            if self.env.main:
                psnr = validate(self.student, self.vq, self.schedule, self.val_set, self.run_dir, self.step,
                                self.sf, self.logger, seed=self.seed)
                if psnr > self.best_psnr:
                    self.best_psnr = psnr
                    state.save_best(self.run_dir, self.step, psnr, self.student.state_dict(), self.ema)
                self.student.train()


REPORTED = (ConfigError, CheckpointError, RunLockedError, TrainingDataError, PeerFailed, FloatingPointError,
            OSError, ValueError)
"""Errors whose message says everything (file, flag, fix): printed as one ``error:`` line."""


def _setup(opts: TrainOptions, env: Dist, lock: RunLock) -> Trainer:
    """Config, run-folder lock, then models and data -- each stage agreed by every rank, so a
    problem stops all of them before the next (no model is built when the config or the lock fails)."""
    with env.together():
        cfg = load_config(opts.cfg_path)
        if env.main:
            taken_over = lock.acquire()
            if taken_over:
                print(f"warning: {taken_over}", file=sys.stderr)
    with env.together():
        return Trainer(opts, env, cfg)


def train(opts: TrainOptions) -> int:
    """Set up the process group, build the run and train it; returns the exit status (a process
    of a multi-process job leaves with it instead: step 5 below).

    Errors in :data:`REPORTED` end the run with one ``error:`` line, printed by rank 0 whichever
    rank hit it (the other ranks exit quietly with the same status); ``opts.debug`` raises them
    instead, with their tracebacks. Under ``torchrun`` the workers stop when the launcher dies.

    Shutdown, in this order, whichever way the run ends:

    1. :meth:`Trainer.fit` closes the progress bar and the TensorBoard writer (threads joined);
    2. the run-folder lock is released (rank 0 has written its last file);
    3. when every rank ends here together (finished, stopped by a signal, or an error they
       agreed on), a barrier: no rank closes its connections while a peer still uses them, and
       rank 0's ``error:`` line is out before torchrun sees another rank's status;
    4. the process group is destroyed;
    5. a process of a multi-process job leaves at once (:func:`_leave`); a single process returns.

    An error that was not agreed on skips the barrier (a peer may be gone) and is re-raised after
    step 4, with its traceback. The parent watch runs to the very end on purpose: it is what ends
    a worker whose launcher died while it waits in step 3.
    """
    env = init_distributed()
    if env.world > 1:
        watch_parent(what=f"rank {env.rank}")
    lock = RunLock(opts.save_dir)
    status, together = 1, False
    try:
        status, together = _setup(opts, env, lock).fit(), True
    except REPORTED as exc:
        if opts.debug:
            raise
        if env.main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        together = getattr(exc, "agreed", False)
    except Exception:
        stop_if_orphaned()  # a peer left because the launcher died: report that, not the collective
        raise
    finally:
        lock.release()
        if dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()
    if env.world > 1:
        _leave(status)
    return status


def _leave(status: int) -> NoReturn:
    """End a process of a multi-process job with ``status`` without interpreter finalization.

    DistributedDataParallel keeps the process group -- and gloo's C++ worker threads -- alive
    past ``destroy_process_group`` (torch 2.14). A worker thread still releasing the last
    collective's tensor needs the GIL for it; during finalization that request ends the thread
    inside a C++ destructor, which is ``std::terminate``: "terminate called without an active
    exception", SIGABRT, and torchrun exits 1 after a complete run (issue 19). Everything of the
    run is written and closed by now (shutdown order in :func:`train`), so nothing is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
