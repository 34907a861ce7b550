"""torch.distributed with backend="commd": run by every rank of a job under
commrun (rank and size from COMM_RANK and COMM_WORLD_SIZE, the rendezvous
through file stores named by argv[1] and argv[1].2). Every result is checked against
values computed here; exits 1 on the first wrong one. With COMMD_TEST_DEVICE
set (cuda, cuda:0) every tensor is made there: the same checks on device memory.
"""
import gc
import os
import subprocess
import sys
import time
import warnings

import torch
import torch.distributed as dist

import commd.backend  # noqa: F401  registers "commd"

if os.environ.get("COMMD_TEST_DEVICE"):
    torch.set_default_device(os.environ["COMMD_TEST_DEVICE"])
rank = int(os.environ["COMM_RANK"])
n = int(os.environ["COMM_WORLD_SIZE"])
dist.init_process_group("commd", init_method=f"file://{sys.argv[1]}", rank=rank, world_size=n)
checks = 0


def check(what, got, want):
    global checks
    if not torch.equal(got, want):
        sys.stdout.write(f"rank {rank}: {what}: got {got.tolist()}, want {want.tolist()}\n")
        sys.exit(1)
    checks += 1


assert dist.get_backend() == "commd" and dist.get_rank() == rank and dist.get_world_size() == n
ranks = torch.arange(n, dtype=torch.float32)

# the reference run's collectives
t = torch.arange(4, dtype=torch.float32) + rank
dist.all_reduce(t)
check("all_reduce", t, sum(torch.arange(4, dtype=torch.float32) + r for r in range(n)))
out = torch.zeros(1)
dist.reduce_scatter_tensor(out, torch.arange(n, dtype=torch.float32) + rank)
check("reduce_scatter_tensor", out, torch.tensor([float(n * rank + n * (n - 1) // 2)]))
gathered = torch.zeros(n)
dist.all_gather_into_tensor(gathered, torch.tensor([float(rank)]))
check("all_gather_into_tensor", gathered, ranks)

# every reduction, on float32 and int64
for op, fold in ((dist.ReduceOp.SUM, sum), (dist.ReduceOp.PRODUCT, lambda v: torch.prod(
        torch.stack(v), 0)), (dist.ReduceOp.MIN, lambda v: torch.stack(v).min(0).values),
        (dist.ReduceOp.MAX, lambda v: torch.stack(v).max(0).values)):
    for dtype in (torch.float32, torch.int64):
        vals = [torch.tensor([r + 1, 3 - r, 2 * r - 1], dtype=dtype) for r in range(n)]
        t = vals[rank].clone()
        dist.all_reduce(t, op=op)
        check(f"all_reduce {op} {dtype}", t, fold(vals))
t = torch.full((5,), float(rank))
dist.all_reduce(t, op=dist.ReduceOp.AVG)
check("all_reduce AVG", t, torch.full((5,), (n - 1) / 2))

# the reductions commd has not are refused by name
for op in ("BAND", "BOR", "BXOR"):
    try:
        dist.all_reduce(torch.ones(1, dtype=torch.int64), op=getattr(dist.ReduceOp, op))
    except ValueError as e:
        if str(e) != f"commd backend: reduction {op} is not one of SUM, PRODUCT, MIN, MAX, AVG":
            sys.stdout.write(f"rank {rank}: all_reduce {op}: {e}\n")
            sys.exit(1)
        checks += 1
    else:
        sys.stdout.write(f"rank {rank}: all_reduce {op} was not refused\n")
        sys.exit(1)

# lists, broadcast, reduce, all_to_all, send/recv, barrier, async
outs = [torch.zeros(2, 3) for _ in range(n)]
dist.all_gather(outs, torch.full((2, 3), float(rank)))
for r in range(n):
    check(f"all_gather[{r}]", outs[r], torch.full((2, 3), float(r)))
out = torch.zeros(3)
dist.reduce_scatter(out, [torch.full((3,), float(rank * 10 + r)) for r in range(n)])
check("reduce_scatter", out, torch.full((3,), float(sum(q * 10 + rank for q in range(n)))))
t = torch.arange(6, dtype=torch.float64) * (rank + 1)
dist.broadcast(t, src=n - 1)
check("broadcast", t, torch.arange(6, dtype=torch.float64) * n)
t = torch.full((4,), float(rank + 1))
dist.reduce(t, dst=0)
check("reduce", t, torch.full((4,), float(n * (n + 1) // 2)) if rank == 0
      else torch.full((4,), float(rank + 1)))
inp = torch.tensor([float(rank * 100 + j) for j in range(n)])
out = torch.zeros(n)
dist.all_to_all_single(out, inp)
check("all_to_all_single", out, torch.tensor([float(i * 100 + rank) for i in range(n)]))
ins = [torch.full((2,), float(rank * 100 + j)) for j in range(n)]
outs = [torch.zeros(2) for _ in range(n)]
dist.all_to_all(outs, ins)
for i in range(n):
    check(f"all_to_all[{i}]", outs[i], torch.full((2,), float(i * 100 + rank)))
# uneven: rank i sends (i + j) % 3 rows of 3 to rank j, as MoE token routing does
def rows(i, j):
    return (i + j) % 3


inp = torch.cat([torch.full((rows(rank, j), 3), float(rank * 100 + j)) for j in range(n)])
out = torch.full((sum(rows(i, rank) for i in range(n)), 3), -1.0)
dist.all_to_all_single(out, inp, [rows(i, rank) for i in range(n)],
                       [rows(rank, j) for j in range(n)])
check("all_to_all_single with split sizes", out,
      torch.cat([torch.full((rows(i, rank), 3), float(i * 100 + rank)) for i in range(n)]))
ins = [torch.full((rows(rank, j) + 1,), rank * 100 + j, dtype=torch.int64) for j in range(n)]
outs = [torch.zeros(rows(i, rank) + 1, dtype=torch.int64) for i in range(n)]
dist.all_to_all(outs, ins)
for i in range(n):
    check(f"uneven all_to_all[{i}]", outs[i],
          torch.full((rows(i, rank) + 1,), i * 100 + rank, dtype=torch.int64))
if rank % 2 == 0 and rank + 1 < n:
    dist.send(torch.arange(8, dtype=torch.int32) + rank, dst=rank + 1)
elif rank % 2 == 1:
    t = torch.zeros(8, dtype=torch.int32)
    dist.recv(t, src=rank - 1)
    check("recv", t, torch.arange(8, dtype=torch.int32) + rank - 1)
# batch_isend_irecv, as pipeline parallelism exchanges activations: torch
# 1.13 posts the ops one by one on a backend other than NCCL, sends first
ops = []
got = [torch.zeros(5), torch.zeros(5)]
for k, peer in enumerate(((rank + 1) % n, (rank - 1) % n)):
    ops.append(dist.P2POp(dist.isend, torch.full((5,), float(rank * 10 + k)), peer))
for k, peer in enumerate(((rank - 1) % n, (rank + 1) % n)):
    ops.append(dist.P2POp(dist.irecv, got[k], peer))
for w in dist.batch_isend_irecv(ops):
    w.wait()
check("batch_isend_irecv from the rank before", got[0], torch.full((5,), (rank - 1) % n * 10.0))
check("batch_isend_irecv from the rank after", got[1], torch.full((5,), (rank + 1) % n * 10.0 + 1))
dist.barrier()
works = [dist.all_reduce(torch.ones(3) * (k + 1), async_op=True) for k in range(3)]
for w in works:
    w.wait()
t = torch.ones(1000)
w = dist.all_reduce(t, async_op=True)
w.wait()
check("async all_reduce", t, torch.full((1000,), float(n)))

# autograd around it: a gradient averaged over ranks, as data parallelism does
w = torch.full((3,), 1.0, requires_grad=True)
loss = (w * (rank + 1)).sum()
loss.backward()
dist.all_reduce(w.grad, op=dist.ReduceOp.AVG)
check("averaged gradient", w.grad, torch.full((3,), (n + 1) / 2))

# DistributedDataParallel: its C++ (the parameter check, the broadcast of
# the module's state, the reducer's bucketed all-reduces) waits on the
# backend's Works itself. 3 SGD steps on each rank's own batches; the
# reference is the same model trained here alone on the mean of every
# rank's loss (each rank's batches drawn again from its seed).
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
ref.load_state_dict(model.state_dict())
if rank:  # DDP starts every rank from rank 0's parameters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
gens = [torch.Generator().manual_seed(100 + r) for r in range(n)]
for step in range(3):
    batches = [(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)) for g in gens]
    x, y = batches[rank]
    opt.zero_grad()
    ((ddp(x) - y) ** 2).mean().backward()
    opt.step()
    ref_opt.zero_grad()
    (sum(((ref(bx) - by) ** 2).mean() for bx, by in batches) / n).backward()
    ref_opt.step()
for (name, p), q in zip(model.named_parameters(), ref.parameters()):
    if not torch.allclose(p.detach(), q.detach(), rtol=1e-5, atol=1e-6):
        sys.stdout.write(f"rank {rank}: DDP {name}: off the reference by "
                         f"{(p - q).abs().max().item()}\n")
        sys.exit(1)
    checks += 1
del ddp

# what commd does not take: told at once, the job goes on
for what, call in (
        ("unequal reduce_scatter blocks", lambda: dist.reduce_scatter(
            torch.zeros(2), [torch.zeros(2)] * (n - 1) + [torch.zeros(3)])),
        ("a send tag", lambda: dist.send(torch.zeros(1), dst=(rank + 1) % n, tag=7))):
    try:
        call()
    except ValueError as e:
        checks += "commd backend" in str(e)
    else:
        sys.stdout.write(f"rank {rank}: {what}: no ValueError\n")
        sys.exit(1)
# what commd fails reaches torch: a mismatched all_reduce raises commd's
# CommError, blocking and from an async Work (is_success() False), and its
# future fails; the job goes on
t = torch.ones(4 + (rank == 0))
for how in ("blocking", "async", "future"):
    try:
        if how == "blocking":
            dist.all_reduce(t)
        else:
            w = dist.all_reduce(t, async_op=True)
            if how == "async":
                w.wait()
            else:
                w.get_future().wait()
    except (commd.CommError, RuntimeError) as e:
        if "COMM_ERR_MISMATCH" not in str(e) or (how == "async" and w.is_success()):
            sys.stdout.write(f"rank {rank}: mismatched all_reduce, {how}: {e!r}\n")
            sys.exit(1)
        checks += 1
    else:
        sys.stdout.write(f"rank {rank}: mismatched all_reduce, {how}: no error\n")
        sys.exit(1)
t = torch.ones(3)
dist.all_reduce(t)
check("all_reduce after a mismatch", t, torch.full((3,), float(n)))
# the process group's methods called with no options, as Gloo's take them:
# SUM, root 0
pg = dist.distributed_c10d._get_default_group()
t = torch.full((3,), float(rank + 1))
pg.allreduce([t]).wait()
check("pg.allreduce with no options", t, torch.full((3,), float(n * (n + 1) // 2)))
t = torch.full((2,), float(rank + 10))
pg.broadcast([t]).wait()
check("pg.broadcast with no options", t, torch.full((2,), 10.0))
t = torch.full((2,), 1.0)
pg.reduce([t]).wait()
if rank == 0:
    check("pg.reduce with no options", t, torch.full((2,), float(n)))
pg.barrier().wait()
# into leaves that require grad, as torch's own backends fill them
t = torch.zeros(3, requires_grad=True)
dist.scatter(t, [torch.full((3,), 5.0 * k) for k in range(n)] if rank == 0 else None, src=0)
check("scatter into a leaf requiring grad", t.detach(), torch.full((3,), 5.0 * rank))
outs = [torch.zeros(2, requires_grad=True) for _ in range(n)]
dist.all_to_all(outs, [torch.full((2,), float(rank * 100 + j)) for j in range(n)])
for i in range(n):
    check(f"all_to_all[{i}] into a leaf requiring grad", outs[i].detach(),
          torch.full((2,), float(i * 100 + rank)))
# async ops on one (staged) tensor run in posting order, as torch's own
# backends run them: the second reads the first's result
t = torch.ones(4)
w1, w2 = dist.all_reduce(t, async_op=True), dist.all_reduce(t, async_op=True)
w2.wait()
w1.wait()
check("two async all_reduces of one tensor", t, torch.full((4,), float(n * n)))
t = torch.full((4,), float(rank + 1))
w1, w2 = dist.all_reduce(t, async_op=True), dist.broadcast(t, src=n - 1, async_op=True)
w2.wait()
w1.wait()
check("an async all_reduce, then a broadcast of its result", t,
      torch.full((4,), float(n * (n + 1) // 2)))
# a list all_to_all's outputs are in place once is_completed() says so
outs = [torch.zeros(2) for _ in range(n)]
w = dist.all_to_all(outs, [torch.full((2,), float(rank * 100 + j)) for j in range(n)],
                    async_op=True)
while not w.is_completed():
    time.sleep(0.001)
for i in range(n):
    check(f"all_to_all[{i}] after is_completed", outs[i], torch.full((2,), float(i * 100 + rank)))

# gather and scatter (an all-gather the root keeps, a broadcast each rank takes
# its block of), and torch's object collectives built on all_gather/broadcast
t = torch.tensor([float(rank), 10.0 + rank])
outs = [torch.zeros(2) for _ in range(n)] if rank == n - 1 else None
dist.gather(t, outs, dst=n - 1)
if rank == n - 1:
    for r in range(n):
        check(f"gather[{r}]", outs[r], torch.tensor([float(r), 10.0 + r]))
t = torch.zeros(3, dtype=torch.int64)
dist.scatter(t, [torch.full((3,), 7 * k, dtype=torch.int64) for k in range(n)]
             if rank == 0 else None, src=0)
check("scatter", t, torch.full((3,), 7 * rank, dtype=torch.int64))
objs = [None] * n
dist.all_gather_object(objs, {"rank": rank, "name": "x" * rank})
if objs != [{"rank": r, "name": "x" * r} for r in range(n)]:
    sys.stdout.write(f"rank {rank}: all_gather_object: {objs}\n")
    sys.exit(1)
objs = [("from", 0), {1: 2}] if rank == 0 else [None, None]
dist.broadcast_object_list(objs, src=0)
if objs != [("from", 0), {1: 2}]:
    sys.stdout.write(f"rank {rank}: broadcast_object_list: {objs}\n")
    sys.exit(1)
checks += 2

# new_group(): a communicator of the group's ranks; torch hands the backend
# group ranks, the calls take world ranks
evens = list(range(0, n, 2))
g = dist.new_group(evens)
ends = dist.new_group([n - 1, 0])
if rank in evens:
    assert dist.get_rank(g) == evens.index(rank) and dist.get_world_size(g) == len(evens)
    t = torch.full((3,), float(rank))
    dist.all_reduce(t, group=g)
    check("all_reduce in new_group(evens)", t, torch.full((3,), float(sum(evens))))
    t = torch.arange(4, dtype=torch.float32) * (rank + 1)
    dist.broadcast(t, src=evens[-1], group=g)
    check("broadcast in new_group(evens)", t,
          torch.arange(4, dtype=torch.float32) * (evens[-1] + 1))
else:
    assert dist.get_rank(g) == -1
if rank in (0, n - 1):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=ends)
    check("all_reduce in new_group([n - 1, 0])", t, torch.tensor([float(n - 1)]))
    if rank == 0:
        dist.send(torch.arange(3) + 7, dst=n - 1, group=ends)
    else:
        t = torch.zeros(3, dtype=torch.int64)
        dist.recv(t, src=0, group=ends)
        check("recv in new_group([n - 1, 0])", t, torch.arange(3) + 7)
dist.barrier()

# a group destroyed and let go leaves its job and its thread ends: the two
# above, then 30 rounds of new_group, all_reduce and destroy_process_group
for grp in (g, ends):
    dist.destroy_process_group(grp)
del g, ends, grp
for i in range(30):
    grp = dist.new_group(list(range(n)))
    t = torch.full((2,), float(rank + i))
    dist.all_reduce(t, group=grp)
    check(f"all_reduce in new_group, round {i}", t, torch.full((2,), float(n * (n - 1) // 2 + n * i)))
    dist.destroy_process_group(grp)
    del grp
gc.collect()
groups_job = f"{commd.backend._world_job}/group-"
for _ in range(200):
    threads = sum(c._t.is_alive() for c in commd.backend._completers)
    jobs = subprocess.run([os.environ["COMMCTL"], "jobs"], capture_output=True, text=True,
                          check=True).stdout
    if threads == 1 and groups_job not in jobs:
        break
    time.sleep(0.05)
else:
    sys.stdout.write(f"rank {rank}: destroyed groups: {threads} completion threads alive (want "
                     f"the world's alone), commctl jobs:\n{jobs}")
    sys.exit(1)
checks += 1
dist.barrier()

# a second process group (a new store: torch takes a file store once): the
# first one's destroy_process_group() left its job, without commd.finalize()
first_job = commd.backend._world_job
w = dist.all_reduce(torch.ones(3), async_op=True)  # seen through first
dist.destroy_process_group()
dist.init_process_group("commd", init_method=f"file://{sys.argv[1]}.2", rank=rank, world_size=n)
if not w.is_completed():
    sys.stdout.write(f"rank {rank}: an op of the destroyed world is not done\n")
    sys.exit(1)
t = torch.full((2,), float(rank))
dist.all_reduce(t)
check("all_reduce in a second process group", t, torch.full((2,), float(n * (n - 1) // 2)))
for _ in range(200):
    jobs = subprocess.run([os.environ["COMMCTL"], "jobs"], capture_output=True, text=True,
                          check=True).stdout
    if first_job not in jobs:
        break
    time.sleep(0.05)
else:
    sys.stdout.write(f"rank {rank}: the destroyed world's job is still there:\n{jobs}")
    sys.exit(1)
checks += 1

# a destroyed world still held, with an op that never ends (rank 0's irecv
# from rank 1, which stays in that job 3 s longer): init_process_group()
# waits _DESTROYED_WAIT_S for it, then aborts that world, whose Work fails
held = dist.group.WORLD
commd.backend._DESTROYED_WAIT_S = 1
if rank == 0:
    stuck = dist.irecv(torch.zeros(2), src=1)
if rank == 1:
    time.sleep(3)
dist.destroy_process_group()
t0 = time.monotonic()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dist.init_process_group("commd", init_method=f"file://{sys.argv[1]}.3", rank=rank,
                            world_size=n)
if rank == 0:
    said = [str(c.message) for c in caught]
    if not any("still running after 1 s" in m and "aborted" in m for m in said):
        sys.stdout.write(f"rank 0: no warning of the destroyed world aborted: {said}\n")
        sys.exit(1)
    try:
        stuck.wait()
    except RuntimeError as e:
        if "aborted" not in str(e):
            sys.stdout.write(f"rank 0: the stuck irecv failed, but not aborted: {e}\n")
            sys.exit(1)
    else:
        sys.stdout.write("rank 0: the destroyed world's stuck irecv did not fail\n")
        sys.exit(1)
    checks += 1
del held
t = torch.full((2,), float(rank + 1))
dist.all_reduce(t)
check("all_reduce in a world made after one aborted", t, torch.full((2,), float(n * (n + 1) // 2)))

# at exit the completion threads stop even while an op is outstanding (an
# irecv rank 1 sends only after): none is left for the interpreter's end
store = dist.distributed_c10d._get_default_store()
if rank == 0:
    dist.irecv(torch.zeros(2), src=1)
    commd.backend._stop_completers()
    alive = [c for c in commd.backend._completers if c._t.is_alive()]
    if alive:
        sys.stdout.write(f"rank 0: {len(alive)} completion threads alive after the stop\n")
        sys.exit(1)
    checks += 1
    store.set("commd-test/stopped", "1")
elif rank == 1:
    store.wait(["commd-test/stopped"])
    commd.send(torch.full((2,), 5.0), 0)
dist.destroy_process_group()
commd.finalize()  # as before the backend left by itself: nothing left to do, no error
sys.stdout.write(f"rank {rank}: torch.distributed backend commd: {checks} checks ok\n")
