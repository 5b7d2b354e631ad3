"""How batches are drawn and how epochs resume; nothing about any one system.

Each system writes its own epoch body in its own file, as nanoGPT's train.py does, and this
module only draws the batches and keeps the checkpoints around it:

    for epoch in train.epochs(model, opt, gen, n_epochs, workdir / "checkpoint.pt", log):
        for idx in train.batches(len(x), batch_size, gen):           # (B,) indices
            loss = F.mse_loss(model(x[idx]), x[idx])                    # the paper's loss
            epoch.add(train.step(opt, loss), len(idx))

Every random draw comes from the torch.Generator the system passes in, and its state is saved
with the model and optimiser after every epoch, so an interrupted run resumes with the same
random stream and ends with the same weights as an uninterrupted one. `domain_mixed_batches`
is JLESS 2022's batch mixing: source and target examples in every batch. `recompute_bn` gives
BatchNorm layers their training data's statistics where a short training left them unsettled.
"""
import contextlib
import io
import time
from pathlib import Path

import torch

import data


def batches(n, size, gen):
    """A random order of range(n) cut into batches of `size` indices (the last one shorter).
    A last batch of one index is dropped: BatchNorm cannot normalise a single example in
    training, and one example in an epoch changes nothing. Yields (B,) int64 tensors."""
    order = torch.randperm(n, generator=gen, device=gen.device)     # on the generator's device
    for start in range(0, n, size):
        idx = order[start:start + size]
        if len(idx) >= 2:
            yield idx


def domain_mixed_batches(is_target, size, gen, *, target_share=0.25):
    """JLESS 2022's batch mixing (section 2.1, figure 1): every batch holds source and target
    examples together, so the few target clips (10 of 1000 per section) are seen every batch
    instead of once in a hundred. An epoch is one random pass over the source examples, in
    batches of size - n_t of them, each completed by n_t = max(1, round(size * target_share))
    target examples taken in turn from a shuffled order of the target examples (reshuffled
    when used up). Without target examples these are `batches` over all of them.
    is_target: (N,) bool tensor on the generator's device. Yields (B,) int64 index tensors.
    The paper gives no share: jless2022 passes the target examples' own share of the data."""
    source, target = (~is_target).nonzero().flatten(), is_target.nonzero().flatten()
    if len(target) == 0:
        yield from batches(len(is_target), size, gen)
        return
    n_t = min(max(1, round(size * target_share)), size - 1)
    order = source[torch.randperm(len(source), generator=gen, device=gen.device)]
    queue = target[:0]
    for start in range(0, len(order), size - n_t):
        while len(queue) < n_t:                             # a fresh shuffle of the targets
            queue = torch.cat([queue, target[torch.randperm(len(target), generator=gen,
                                                            device=gen.device)]])
        idx = torch.cat([order[start:start + size - n_t], queue[:n_t]])
        queue = queue[n_t:]
        yield idx


# A BatchNorm layer's running statistics are an exponential average started at mean 0 and
# variance 1: after n updates at momentum 0.1, 0.9^n of that start remains. Where the real
# variance is smaller than that leftover, eval mode shrinks the differences between inputs at
# every layer, and after a few dozen layers every embedding is one point (shinmura2020 on 52
# real clips; jless2022's 3-update smoke run: the clips' standard deviation 0.25 after the
# first layer, 2e-5 after the last, against 0.5-1.0 in training mode). A system recomputes the
# statistics where some layer still holds more than BN_RESIDUE of its start (at momentum 0.1:
# fewer than 44 updates); on the papers' sets every layer has seen thousands of updates and
# nothing changes. Not sooner: on short runs exact statistics score no better than the trained
# ones (systems/shinmura2020.py gives the measurements).
BN_RESIDUE = 1e-2


def batchnorms(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def bn_updates(net):
    """The fewest running-statistics updates of any BatchNorm layer of net (None: it has none)."""
    return min((int(m.num_batches_tracked) for m in batchnorms(net)), default=None)


def bn_unsettled(net, residue=BN_RESIDUE):
    """True when some BatchNorm layer's running statistics still hold more than `residue` of
    their start (mean 0, variance 1): (1 - momentum) ** num_batches_tracked > residue."""
    return any(m.momentum is not None and (1 - m.momentum) ** int(m.num_batches_tracked) > residue
               for m in batchnorms(net))


def recompute_bn(net, x, size, prepare=lambda xb: xb):
    """BatchNorm statistics as plain averages (SWA's update_bn) over x, in batches of `size`
    passed through prepare, none of one (it could not be normalised); a single example gives
    none, and the statistics are left as trained."""
    ends = list(range(0, len(x), size)) + [len(x)]
    if len(ends) > 2 and ends[-1] - ends[-2] == 1:
        del ends[-2]
    if len(x) > 1:
        torch.optim.swa_utils.update_bn((prepare(x[a:b]) for a, b in zip(ends, ends[1:])), net)


def step(opt, loss):
    """One optimiser step on loss. Returns the loss, detached (no copy to the host)."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


class Epoch:
    """One epoch: its number (1-based) and the mean of the losses added to it."""

    def __init__(self, number):
        self.number, self.total, self.count = number, 0.0, 0

    def add(self, loss, n=1):
        """Count a batch's mean loss for n examples (a tensor stays on its device)."""
        self.total, self.count = self.total + loss * n, self.count + n

    @property
    def loss(self):
        return float(self.total) / max(self.count, 1)


def epochs(module, opt, gen, n, checkpoint, log, *, what="epoch", scheduler=None):
    """Yield Epoch 1..n, saving module, optimiser and generator state to `checkpoint` (written
    atomically) after each: an interrupted run resumes after the last saved epoch, with the
    same random stream. The body runs in the caller, between the yield and the save. A
    learning-rate scheduler's state is saved and restored with them; the body steps it."""
    start = 0
    if Path(checkpoint).exists():
        ck = load_checkpoint(checkpoint)
        module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        if scheduler is not None:
            scheduler.load_state_dict(ck["scheduler"])
        start = ck["epoch"]
        log(f"resuming {what} {start} of {n} from {checkpoint}")
    t0 = time.monotonic()
    for number in range(start + 1, n + 1):
        epoch = Epoch(number)
        yield epoch
        state = {"model": module.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                 "epoch": number}
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        save(state, checkpoint)
        spent = time.monotonic() - t0
        left = spent / (number - start) * (n - number)
        log(f"{what} {number}/{n}  loss {epoch.loss:.4f}  {duration(spent)}, "
            f"about {duration(left)} left")


def duration(seconds):
    """12 s, 3 min 05 s, 1 h 02 min: a progress line's time."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def load_checkpoint(path):
    """The checkpoint `epochs` saved at path; truncated or damaged (a copy cut short, a disk
    error): a DataError naming it and saying how to start over."""
    try:
        ck = torch.load(path, weights_only=False)
    except Exception as e:       # torch.load raises several types; the path and reason matter
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise data.DataError(f"{path}: a truncated or damaged checkpoint ({reason}); delete it "
                             f"to start this training over from epoch 1") from None
    if not (isinstance(ck, dict) and {"model", "opt", "gen", "epoch"} <= set(ck)):
        raise data.DataError(f"{path}: not a checkpoint of asd's; delete it to start "
                             f"this training over from epoch 1")
    return ck


def save(obj, path):
    """torch.save through data.write_atomic: a crash never leaves half a checkpoint. The bytes
    are made in memory and written at once: torch turns a failed write (a full disk) into a
    RuntimeError that has lost its OSError, and write_atomic names the file only for that."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data.write_atomic(path, lambda f: f.write(buffer.getbuffer()))


@contextlib.contextmanager
def seeded(seed):
    """Within this block torch's global generator starts from `seed`, and it is restored after:
    a network built inside gets the same initial weights whatever ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
