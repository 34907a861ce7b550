#!/usr/bin/env python3
"""reference.py: the reference run (shared/reference/reference-run.txt) in
torch over commd: collectives, the bandwidth benchmark and data-, tensor- and
pipeline-parallel training of the MLP of tests/demos/mlp.c, bitwise the same
parameters, batch and targets.

Run as `commrun -n 4 python3 reference.py [--bench-elements N] [--steps N]`.
Each rank prints the lines the C demos print (tests/demos/collectives.c,
`commbench --reference`, data_parallel.c, tensor_parallel.c,
pipeline_parallel.c) and checks its numbers as they do: exact values for the
collectives, the same parameters and activations on every rank, and results
equal to one process running the unsplit model. Exits 1 when a check fails.
"""

import argparse
import hashlib
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import commd

# tests/demos/mlp.h
LAYERS = 4
DIM = 1024
BATCH = 128
LR = 1.0
SEED_WEIGHTS = 0x636F6D6D64  # "commd"
SEED_INPUT = 0x696E707574  # "input"
SEED_TARGET = 0x7461726774  # "targt"

STEPS = 2  # data_parallel.c
MICRO_BATCHES = 4  # pipeline_parallel.c
# max |ours - unsplit| / max |unsplit|, as the C demos allow: float rounding
# of sums taken in another order is about 1e-7; a missing or wrong
# collective is 1e-4 or more.
TOLERANCE = 1e-5

BENCH_ELEMENTS = 104857600  # commbench.c REF_ELEMENTS: 400 MB of float32
BENCH_WARMUP = 1  # commbench --reference
BENCH_ITERS = 3

def say(line):
    """Print line with one write(2): the ranks share stdout, and print()
    writes the text and its newline in two calls, which lets another
    rank's line in between."""
    data = (line + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


class CheckFailed(Exception):
    """A result that differs from what it must be; the message says how."""


# -- the MLP of tests/demos/mlp.c -----------------------------------------


def fill_uniform(n, seed, lo, hi):
    """mlp.c's fill_uniform, vectorised: n float32 uniform in [lo, hi).

    splitmix64's state after i steps is seed + i * golden (mod 2^64), so
    every draw is computed at once; the float32 arithmetic is mlp.c's,
    operation for operation (no fused multiply-add), so the values are
    bitwise the same.
    """
    i = np.arange(1, n + 1, dtype=np.uint64)
    z = np.uint64(seed) + i * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    u = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    lo, hi = np.float32(lo), np.float32(hi)
    return lo + (hi - lo) * u


def mlp_weights():
    """The model's layers, each DIM x DIM (in x out: y = x @ w)."""
    bound = np.float32(1.0) / np.sqrt(np.float32(DIM))
    return [
        torch.from_numpy(fill_uniform(DIM * DIM, SEED_WEIGHTS + l, -bound, bound)).view(DIM, DIM)
        for l in range(LAYERS)
    ]


def mlp_batch():
    """The fixed input batch and targets, both BATCH x DIM."""
    x = fill_uniform(BATCH * DIM, SEED_INPUT, -1.0, 1.0)
    t = fill_uniform(BATCH * DIM, SEED_TARGET, -0.2, 0.2)
    return torch.from_numpy(x).view(BATCH, DIM), torch.from_numpy(t).view(BATCH, DIM)


def forward(ws, x, first=0, last=LAYERS):
    """Layers [first, last) on x: ReLU between layers, the last linear."""
    for l in range(first, last):
        if l > 0:
            x = torch.relu(x)
        x = x @ ws[l]
    return x


def grad_step(ws, x, t):
    """The MSE loss of x against t; leaves its gradients in each w.grad."""
    for w in ws:
        w.grad = None
    loss = F.mse_loss(forward(ws, x), t)
    loss.backward()
    return loss.item()


def sgd(ws, grads):
    with torch.no_grad():
        for w, g in zip(ws, grads):
            w -= LR * g


def rel_diff(a, b):
    """max |a - b| / max |b| (max |a - b| when b is all zero), as mlp.c."""
    diff = (a.double() - b.double()).abs().max().item()
    top = b.double().abs().max().item()
    return diff / top if top > 0 else diff


def summary(v):
    """'ROWSxCOLS[first...]', the first element with 4 decimals."""
    return f"{v.shape[0]}x{v.shape[1]}[{v.reshape(-1)[0].item():.4f}...]"


def digest(tensors):
    """A 64-bit hash of the tensors' bytes, as a signed int for int64."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def same_everywhere(tensors, what, world):
    """Check that every rank holds bitwise the same tensors."""
    hashes = commd.empty((world,), torch.int64)
    mine = commd.empty((1,), torch.int64)
    mine[0] = digest(tensors)
    commd.all_gather(hashes, mine)
    for q, h in enumerate(hashes.tolist()):
        if h != mine.item():
            raise CheckFailed(f"rank {q}'s {what} differ from ours")


# -- the sections ---------------------------------------------------------


def check_equal(what, got, want):
    if not torch.equal(got, want):
        raise CheckFailed(f"{what}: {got.tolist()}, expected {want.tolist()}")


def collectives(rank, world, extra):
    """The reference's all-reduce, reduce-scatter and all-gather lines
    (tests/demos/collectives.c); extra: then broadcast, reduce, all-to-all
    and barrier as that demo prints them."""
    p = f"Rank {rank}"
    f32 = torch.float32
    ramp = torch.arange(world, dtype=f32)
    sums = ramp * world + world * (world - 1) // 2  # [6, 10, 14, 18] for 4
    inp = commd.empty((world,), f32)
    out = commd.empty((world,), f32)
    one = commd.zeros((1,), f32)
    inp.copy_(ramp + rank)

    say(f"{p} [before all-reduce]: {inp}")
    out.copy_(inp)
    commd.all_reduce(out, op=commd.ReduceOp.SUM)
    say(f"{p} [after all-reduce]: {out}")
    check_equal("all-reduce", out, sums)

    say(f"{p} [before reduce-scatter]: input = {inp}, output = {one}")
    commd.reduce_scatter(one, inp, op=commd.ReduceOp.SUM)
    say(f"{p} [after reduce-scatter]: input = {inp}, output = {one}")
    check_equal("reduce-scatter", one, sums[rank : rank + 1])

    out.copy_(inp)
    say(f"{p} [before all-gather]: input = {one}, output = {out}")
    commd.all_gather(out, one)
    say(f"{p} [after all-gather]: input = {one}, output = {out}")
    check_equal("all-gather", out, sums)
    if not extra:
        return

    out.copy_(ramp + rank)
    say(f"{p} [before broadcast]: {out}")
    commd.broadcast(out, 0)
    say(f"{p} [after broadcast]: {out}")
    check_equal("broadcast", out, ramp)

    # in place: rank 0's t gets the sums, the others' t is left as it was;
    # the output the C demo prints is its separate buffer, zero but on rank 0
    red = commd.empty((world,), f32)
    red.copy_(inp)
    commd.reduce(red, 0, op=commd.ReduceOp.SUM)
    check_equal("reduce", red, sums if rank == 0 else inp)
    if rank == 0:
        out.copy_(red)
    else:
        out.zero_()
    say(f"{p} [after reduce to rank 0]: input = {inp}, output = {out}")

    inp.copy_(ramp + world * rank)
    commd.all_to_all(out, inp)
    say(f"{p} [after all-to-all]: input = {inp}, output = {out}")
    check_equal("all-to-all", out, ramp * world + rank)

    commd.barrier()
    say(f"{p} [barrier]: every rank has arrived")


def bench(rank, world, elements):
    """`commbench --reference`: all-reduce and reduce-scatter (SUM) of
    `elements` float32 in zero-copy buffers; each rank prints the median of
    its own times over BENCH_ITERS runs, after BENCH_WARMUP, each after a
    barrier, and the bus bandwidth in GiB/s that follows from it."""
    buf = commd.empty((elements,), torch.float32)
    cases = [
        ("all_reduce", elements, 2.0 * (world - 1) / world),
        ("reduce_scatter", elements // world * world, (world - 1) / world),
    ]
    for tag, n, factor in cases:
        inp = buf[:n]
        out = commd.empty((n // world,), torch.float32) if tag == "reduce_scatter" else None
        inp.fill_(1.0)
        times = []
        for i in range(BENCH_WARMUP + BENCH_ITERS):
            commd.barrier()
            t0 = time.perf_counter()
            if out is None:
                commd.all_reduce(inp, op=commd.ReduceOp.SUM)
            else:
                commd.reduce_scatter(out, inp, op=commd.ReduceOp.SUM)
            if i >= BENCH_WARMUP:
                times.append(time.perf_counter() - t0)
        # ones summed: in place, world^runs after the all-reduces
        got = inp if out is None else out
        want = float(world) ** (BENCH_WARMUP + BENCH_ITERS) if out is None else float(world)
        if not bool((got == want).all()):
            raise CheckFailed(f"{tag}: {int((got != want).sum())} wrong elements")
        t = statistics.median(times)
        head = f"[{tag}] Rank {rank}: {tag}"
        say(f"{head}(world_size={world}, num_elements={n}) took {t * 1e3:.2f}ms")
        commd.barrier()
        say(f"{head} measured bandwidth = {n * 4 * factor / t / 2**30:.0f} GB/s")
        commd.barrier()


def data_parallel(rank, world, steps):
    """data_parallel.c: every rank the whole model, its slice of the batch;
    gradients all-reduced (AVG) before each SGD step."""
    tag = "[data_parallelism]"
    if BATCH % world:
        raise CheckFailed(f"a batch of {BATCH} does not split over {world} ranks")
    rows = BATCH // world
    x, t = mlp_batch()
    xs, ts = x[rank * rows : (rank + 1) * rows], t[rank * rows : (rank + 1) * rows]
    ws = [w.clone().requires_grad_() for w in mlp_weights()]
    ref = [w.clone().requires_grad_() for w in mlp_weights()] if rank == 0 else None
    grads = commd.empty((LAYERS, DIM, DIM), torch.float32)
    lossbuf = commd.empty((1,), torch.float32)

    for step in range(steps):
        loss = grad_step(ws, xs, ts)
        for l, w in enumerate(ws):
            grads[l].copy_(w.grad)
        commd.all_reduce(grads, op=commd.ReduceOp.AVG)
        sgd(ws, grads)
        params = [summary(w) for w in ws]
        say(f"{tag} Rank {rank}: step = {step}, loss = {loss!r}, params = {params}")
        same_everywhere(ws, "parameters", world)

        lossbuf[0] = loss
        commd.all_reduce(lossbuf, op=commd.ReduceOp.AVG)
        if ref is None:
            continue
        # the unsplit model on the whole batch, one process
        ref_loss = grad_step(ref, x, t)
        sgd(ref, [w.grad for w in ref])
        diff = max(rel_diff(w, r) for w, r in zip(ws, ref))
        if not diff <= TOLERANCE:
            raise CheckFailed(
                f"step {step}: parameters differ from the unsplit model's by "
                f"{diff:.3g} (relative), over {TOLERANCE:g}"
            )
        mean = lossbuf.item()
        if not abs(mean - ref_loss) <= TOLERANCE * abs(ref_loss):
            raise CheckFailed(
                f"step {step}: mean loss over ranks {mean:.9g}, the unsplit model's {ref_loss:.9g}"
            )


@torch.no_grad()
def tensor_parallel(rank, world):
    """tensor_parallel.c: every rank a column slice of each layer; the
    slices of each layer's output all-gathered into the next one's input."""
    tag = "[tensor_parallelism]"
    if DIM % world:
        raise CheckFailed(f"{DIM} columns do not split over {world} ranks")
    cols = DIM // world
    ws = mlp_weights()
    slices = [w[:, rank * cols : (rank + 1) * cols].contiguous() for w in ws]
    x, _ = mlp_batch()
    mine = commd.empty((BATCH, cols), torch.float32)
    gathered = commd.empty((world, BATCH, cols), torch.float32)

    act = x
    for l in range(LAYERS):
        if l > 0:
            act = torch.relu(act)
        torch.matmul(act, slices[l], out=mine)
        commd.all_gather(gathered, mine)
        # rank q's block holds columns q * cols.. of every row
        act = torch.cat(list(gathered), dim=1)
    say(f"{tag} Rank {rank}: forward pass produced activations {summary(act)}")

    diff = rel_diff(act, forward(ws, x))
    if not diff <= TOLERANCE:
        raise CheckFailed(
            f"activations differ from the unsplit model's by {diff:.3g} "
            f"(relative), over {TOLERANCE:g}"
        )
    same_everywhere([act], "activations", world)


@torch.no_grad()
def pipeline_parallel(rank, world):
    """pipeline_parallel.c: each rank a contiguous block of layers (4 / n,
    the first 4 % n ranks one more); micro-batches sent rank to rank."""
    tag = "[pipeline_parallelism]"
    if world > LAYERS:
        raise CheckFailed(f"{LAYERS} layers do not split over {world} ranks")

    def first_layer(r):
        base, extra = divmod(LAYERS, world)
        return r * base + min(r, extra)

    first, last = first_layer(rank), first_layer(rank + 1)
    rows = BATCH // MICRO_BATCHES
    ws = mlp_weights()
    x, _ = mlp_batch()
    buf = commd.empty((rows, DIM), torch.float32)
    outs = []

    for k in range(MICRO_BATCHES):
        if rank == 0:
            buf.copy_(x[k * rows : (k + 1) * rows])
        else:
            commd.recv(buf, rank - 1)
            say(f"{tag} Rank {rank}: received {summary(buf)} from rank {rank - 1}")
        buf.copy_(forward(ws, buf, first, last))
        if rank < world - 1:
            say(f"{tag} Rank {rank}: sending {summary(buf)} to rank {rank + 1}")
            commd.send(buf, rank + 1)
        else:
            outs.append(buf.clone())

    if rank == world - 1:
        out = torch.cat(outs)
        say(f"{tag} Rank {rank}: pipeline produced outputs {summary(out)}")
        diff = rel_diff(out, forward(ws, x))
        if not diff <= TOLERANCE:
            raise CheckFailed(
                f"outputs differ from the unsplit model's by {diff:.3g} "
                f"(relative), over {TOLERANCE:g}"
            )


# -- main -----------------------------------------------------------------


def positive(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s} is not a positive number")
    return v


def main():
    ap = argparse.ArgumentParser(description="The reference run in torch over commd.")
    ap.add_argument(
        "--bench-elements",
        type=positive,
        default=BENCH_ELEMENTS,
        help=f"float32 elements the benchmark's ops take (default {BENCH_ELEMENTS})",
    )
    ap.add_argument(
        "--steps",
        type=positive,
        default=STEPS,
        help=f"data-parallel training steps (default {STEPS}, as the C demo)",
    )
    ap.add_argument(
        "--all-collectives",
        action="store_true",
        help="also broadcast, reduce, all-to-all and barrier, as tests/demos/collectives",
    )
    args = ap.parse_args()

    commd.init()
    rank, world = commd.get_rank(), commd.get_world_size()
    # the ranks share the node's cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if args.bench_elements < world:
        print(f"reference.py: --bench-elements {args.bench_elements}: fewer than "
              f"{world} float32", file=sys.stderr)
        commd.finalize()
        return 2
    section = "collectives"
    try:
        collectives(rank, world, args.all_collectives)
        section = "benchmark"
        bench(rank, world, args.bench_elements)
        section = "data_parallelism"
        data_parallel(rank, world, args.steps)
        section = "tensor_parallelism"
        tensor_parallel(rank, world)
        section = "pipeline_parallelism"
        pipeline_parallel(rank, world)
    except CheckFailed as e:
        print(f"[{section}] Rank {rank}: {e}", file=sys.stderr)
        return 1
    except commd.CommError as e:
        print(f"[{section}] Rank {rank}: {e}", file=sys.stderr)
        return 1
    commd.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
