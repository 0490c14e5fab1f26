"""
The plumbing the scripts share, one copy of each: the command line built from a config dataclass,
the torchrun / device setup, the precision choice and its autocast, random-state save and restore,
the pieces of a training loop (resume path, epoch loader, loss check, progress row), JSON-lines
logging, and the one-line error exit. None of it is the method (that is unip.py).
"""

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import unip

# -----------------------------------------------------------------------------
# configuration: the command line is the dataclass


def parse_config(config_cls, argv=None, doc=None, choices=None, recipe=None, check=None):
    """A `config_cls` instance from the command line: one flag per field (`--batch-size` for
    batch_size), the help text taken from the field's trailing comment. bool fields get --x / --no-x;
    list fields repeat or take comma lists (--x a,b --x c); tuple fields take their values after one
    flag (--thresholds 0.06 0.12). `choices` maps field names to allowed values. `recipe(cfg)` may
    return other defaults that depend on the parsed values (train_seg.py's ViT-L recipe): the command
    line is read again with them, so flags given explicitly still win. `check(cfg)` may fill in fields
    that depend on others and returns an error message or None (or raises ValueError with one); a message
    ends the parse as argparse's own errors do (usage, the message, exit status 2)."""
    helps = dict(re.findall(r"^\s+(\w+):.*?#\s*(.+)$", inspect.getsource(config_cls), re.M))
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults, choices = config_cls(), choices or {}
    for f in dataclasses.fields(config_cls):
        d, flag = getattr(defaults, f.name), "--" + f.name.replace("_", "-")
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else repr(d)
        h = f"{helps.get(f.name, '')} (default: {shown})"
        if isinstance(d, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=d, help=h)
        elif isinstance(d, list):
            p.add_argument(flag, action="append", default=argparse.SUPPRESS, help=h)
        elif isinstance(d, tuple):
            p.add_argument(flag, nargs=len(d) or "*", type=type(d[0]) if d else int, default=d, help=h)
        else:
            p.add_argument(flag, type=type(d), default=d, choices=choices.get(f.name), help=h)

    def read():
        args = vars(p.parse_args(argv))
        for f in dataclasses.fields(config_cls):
            d = getattr(defaults, f.name)
            if isinstance(d, list):
                given = args.get(f.name) or d
                args[f.name] = [s.strip() for item in given for s in str(item).split(",") if s.strip()]
            elif isinstance(d, tuple):
                args[f.name] = tuple(args[f.name])
        return config_cls(**args)

    cfg = read()
    if recipe is not None and (extra := recipe(cfg)):
        p.set_defaults(**extra)
        cfg = read()
    if check is not None:
        try:
            msg = check(cfg)
        except ValueError as e:
            msg = str(e)
        if msg:
            p.error(msg)
    return cfg


# -----------------------------------------------------------------------------
# distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE, srun sets SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID; plain `python` runs one process


@dataclass
class Runtime:
    ddp: bool  # launched by torchrun or srun
    rank: int
    local_rank: int
    world: int
    device: torch.device
    master: bool  # rank 0: prints, logs and saves

    def print(self, *a, **k):
        if self.master:
            print(*a, **k)


def slurm_hosts(nodelist):
    """SLURM's compressed host list -> host names, in order, zero padding kept:
    'node[01-03,07],gpu-b3' -> ['node01', 'node02', 'node03', 'node07', 'gpu-b3']."""
    item = r"(?:[^,\[\]]|\[[^\[\]]+\])+"  # a name with [ranges] groups; the commas between items are outside []
    if not re.fullmatch(rf"{item}(?:,{item})*", nodelist):
        raise ValueError(f"cannot read the SLURM host list {nodelist!r}; set MASTER_ADDR to the first node's address")
    hosts = []
    for name in re.findall(item, nodelist):
        group = re.search(r"\[([^\]]+)\]", name)
        if group is None:
            hosts.append(name)
            continue
        for part in group[1].split(","):  # '01-03' or '07'; a later [group] in the name expands in the recursion
            lo, _, hi = part.partition("-")
            if not (lo.isdigit() and (hi or lo).isdigit()):
                raise ValueError(f"cannot read {part!r} in the SLURM host list {nodelist!r}; set MASTER_ADDR")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts += slurm_hosts(name[:group.start()] + str(i).zfill(len(lo)) + name[group.end():])
    return hosts


def slurm_env(env):
    """The variables torchrun would set, from SLURM's, for a task that srun started without torchrun
    (rank = SLURM_PROCID, world = SLURM_NTASKS, local rank = SLURM_LOCALID; the address of rank 0 from
    MASTER_ADDR or the job's first node). {} where RANK is set (torchrun, also inside an allocation) or
    SLURM runs one task (SLURM_NTASKS=1, a salloc shell)."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", 1)) < 2:
        return {}
    nodes = env.get("SLURM_JOB_NODELIST")
    addr = env.get("MASTER_ADDR") or (slurm_hosts(nodes)[0] if nodes else None)
    if not addr:
        raise SystemExit("error: srun started this task, but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: "
                         "export MASTER_ADDR=<first node's host name> in the job script")
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": addr, "MASTER_PORT": env.get("MASTER_PORT", "29500")}


def setup_distributed(device="auto"):
    """One process per GPU under torchrun or srun (NCCL; gloo on CPUs), else one process on `device`
    (auto: CUDA if there is one)."""
    slurm = slurm_env(os.environ)
    if slurm and torch.cuda.device_count() == 1:  # one GPU bound to each task (--gpus-per-task=1): cuda:0
        slurm["LOCAL_RANK"] = "0"
    os.environ.update(slurm)  # srun alone: init_process_group reads them as under torchrun
    if "RANK" in os.environ:
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
        dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return Runtime(True, rank, local_rank, world, dev, rank == 0)
    dev = torch.device(device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    return Runtime(False, 0, 0, 1, dev, True)


# -----------------------------------------------------------------------------
# precision


def precision(amp, device):
    """--amp -> (precision 'bf16' | 'fp16' | 'none', why (for the banner), autocast(): a fresh autocast
    context each call). On CUDA also turns on TF32 for the fp32 matmuls and convolutions."""
    device = torch.device(device)
    amp, why = unip.resolve_amp(amp, device)
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return amp, why, lambda: torch.autocast(device.type, dtype, enabled=amp != "none")


# -----------------------------------------------------------------------------
# random state: one layout in every checkpoint, {"ranks": [{"torch": ..., "cuda": ...}, ...]}


def rng_state(rt):
    """Every process's random state (a collective call under DDP), so that a resume on the same number
    of processes continues each stream."""
    st = {"torch": torch.get_rng_state(),
          "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None}
    states = [st] * rt.world
    if rt.ddp:
        states = [None] * rt.world
        dist.all_gather_object(states, st)
    return {"ranks": states}


def restore_rng(rt, saved, seed, step):
    """Continue this process's saved stream; on another process count, re-seed from (seed, rank, step).
    Returns False when it had to re-seed. Also reads the layout of train_pretrain.py checkpoints written
    before this module existed ({"torch": [per rank], "cuda": [per rank]})."""
    if "ranks" in saved:
        states = saved["ranks"]
    else:
        cuda = saved.get("cuda") or [None] * len(saved["torch"])
        states = [{"torch": t, "cuda": c} for t, c in zip(saved["torch"], cuda)]
    if len(states) == rt.world:
        torch.set_rng_state(states[rt.rank]["torch"])
        if states[rt.rank]["cuda"] is not None and rt.device.type == "cuda":
            torch.cuda.set_rng_state(states[rt.rank]["cuda"], rt.device)
        return True
    torch.manual_seed(seed + rt.rank + 7919 * step)
    return False


# -----------------------------------------------------------------------------
# the training loop's pieces


def resume_path(resume, out):
    """--resume: a path, '' (none) or 'auto' (OUT/ckpt.pt when it exists, else none)."""
    if resume != "auto":
        return resume
    path = os.path.join(out, "ckpt.pt")
    return path if os.path.exists(path) else ""


def epoch_loader(dataset, sampler, epoch, skip, batch_size, workers, seed, device):
    """This process's batches of `epoch` from its `skip`-th sample on (a mid-epoch resume). The sampler's order
    and the dataset's augmentation draws follow the epoch; the list of indices is made anew each epoch."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=list(sampler)[skip:], drop_last=True,
                      num_workers=workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed + epoch))  # workers' seeds, never the global RNG


def mean_loss(loss_sum, loss_n, ddp):
    """The mean of `loss_n` losses summed on the device, over every process: the only host sync."""
    v = loss_sum / max(loss_n, 1)
    if ddp:
        dist.all_reduce(v, op=dist.ReduceOp.AVG)
    return v.item()


def check_finite(value, step, ckpt_path):
    """A non-finite loss stops the run before anything is saved from it; the last good checkpoint is named."""
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss at step {step}: {value}; last good checkpoint: "
                                 f"{ckpt_path if ckpt_path and os.path.exists(ckpt_path) else 'none (none saved yet)'}")


def progress_row(step, epoch, loss, lr, steps, seconds, images_per_step, device):
    """One log row: where the run is, the mean loss, the lr, the speed over the last `steps` steps."""
    row = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
           "img_per_s": round(steps * images_per_step / max(seconds, 1e-9), 2),
           "ms_per_step": round(1000 * seconds / max(steps, 1), 1)}
    if device.type == "cuda":
        row["mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


# -----------------------------------------------------------------------------
# logging and errors


def log_row(folder, row, master=True):
    """Append one JSON line to folder/log.jsonl (rank 0 only)."""
    if master:
        with open(os.path.join(folder, "log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def run(main):
    """Run a script's main(); a user error (missing file, damaged checkpoint, bad setting) ends with one
    line 'error: ...' and exit status 1 instead of a traceback."""
    try:
        return main()
    except unip.USER_ERRORS as e:
        sys.exit(f"error: {e}")
