"""Pixel-pixel similarity transfer (SimFormer §3.4): SimNet trained on base pixels, distilled into novel scores.

Two losses, computed on the FINAL decoder layer only (SimFormer keeps them out of the auxiliary layers):

* ``loss_sim`` (SimLoss): SimNet learns "do these two pixels belong to the same class?" from pairs of
  sampled pixel embeddings (``mask_features``) with base-class labels. The embeddings are detached, so this
  loss trains SimNet and nothing else.
* ``loss_distill`` (DistLoss): on pixels outside the base region of two images that share a novel class,
  the frozen SimNet (teacher, no gradient) judges pixel pairs; the segmenter's novel-class score vectors
  (student) are pulled to agree, via ReLU(cosine). Gradients reach ``pred_logits`` / ``pred_masks`` only.

Pairs of images come from ``batch["pairs"]`` (P x 2 batch indices). A cross pair (a, b) samples J points in
each image and forms all J x J pairs in both directions, ``[f_a; f_b]`` and ``[f_b; f_a]``, exactly what
SimFormer's 0<->1 batch swap does with its one pair per GPU. A self pair (b, b) samples one set of J points
and forms its J x J ordered pairs once: the reverse direction would repeat the same pairs (the diagonal,
a pixel with itself, is kept; it is 1/J of the pairs).

Normalisation: SimFormer runs one pair per GPU and DDP averages the per-GPU losses, so each pair is
normalised on its own (SimLoss by its own valid-pair count, DistLoss by its own J x J pair count) and the
losses are the mean over pairs; a pair without valid / distillable pixels contributes 0 to that mean, as an
idle GPU did.

Decisions on SimFormer's quirks (see also the class docstrings):

* Pair validity is OR (at least one of the two pixels is base), as in SimFormer (§8 quirk 2). A base pixel
  against a non-base pixel is a genuine negative ("different class") whatever the non-base pixel is; only
  pairs of two non-base pixels are unknown.
* Labels: the weak map (base ids, 255 elsewhere) is used. With the OR rule it gives exactly the SimNet
  labels of SimFormer's full ground truth: a valid pair has a base pixel with its true id, and the other
  pixel is either base (true id in both maps) or non-base (novel id or 255 in the full map, 255 in the weak
  map; both differ from the base id, so the label is 0 either way). Pairs of two non-base pixels differ
  (novel A vs novel B is 0 in the full map, 255 vs 255 is 1 in the weak map) but are invalid. A label map
  that carries novel ids works too: the base region excludes ``novel_ids`` explicitly.
* Balanced weights count only VALID pairs, all of them (SimFormer counts every 5th pair in each dimension,
  valid or not). Counting valid pairs is what makes the weights independent of the label map (above: the
  invalid pairs' labels differ between the weak and full maps) and matches the pairs the weights multiply;
  subsampling was only a cheap estimate of the same ratio.
* DistLoss points exclude padding by default (``distill_padding=False``); SimFormer samples the whole
  non-base region, padding included. Padding has no image content and no test-time counterpart, and on
  scale-jittered 640 crops it can be a large share of the non-base region, so excluding it makes every
  distillation point land on real novel/unlabelled pixels. ``distill_padding=True`` restores SimFormer.
* Teacher batch norm: ``teacher_bn="batch"`` (default, SimFormer) normalises the teacher's pairs with their
  own batch statistics, as SimFormer's teacher ran in train mode; unlike SimFormer it does not update the
  running statistics with them (they are not used in training either way; keeping them base-pair only keeps
  ``teacher_bn="running"`` meaningful). ``"running"`` uses the running statistics of the SimLoss batches.
  In eval mode both use running statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakshot.config import SimilarityConfig
from weakshot.losses.matcher import nearest_downsample

IGNORE_LABEL = 255
_EPS = 1e-5
_LOG_CLAMP = 0.01  # SimFormer's clamp of teacher and student for the "ce" distillation loss


# --- SimNet ----------------------------------------------------------------------------------------------


def _norm(bn: nn.BatchNorm1d, x: Tensor, stats: str) -> Tensor:
    """Batch norm with an explicit choice of statistics.

    ``"auto"``: the module's own train/eval behaviour. ``"batch"``: this batch's statistics, running
    statistics left untouched. ``"running"``: the running statistics (eval behaviour).
    """
    if stats == "auto":
        return bn(x)
    if stats == "batch":
        return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    if stats == "running":
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
    raise ValueError(f"stats must be 'auto', 'batch' or 'running', not {stats!r}")


def _bn_mode(bn: nn.BatchNorm1d, stats: str) -> tuple[bool, bool]:
    """What :func:`_norm` does for ``stats``: (normalise with the batch's statistics?, update the running
    statistics with them?), following ``nn.BatchNorm1d.forward`` for ``"auto"``."""
    if stats == "auto":
        batch = bn.training or bn.running_mean is None
        return batch, bn.training and bn.running_mean is not None
    if stats == "batch":
        return True, False
    if stats == "running":
        return False, False
    raise ValueError(f"stats must be 'auto', 'batch' or 'running', not {stats!r}")


@torch.no_grad()
def _update_running(bn: nn.BatchNorm1d, mean: Tensor, var: Tensor, count: int) -> None:
    """The running-statistics update of ``nn.BatchNorm1d`` in training (unbiased variance, momentum or,
    when ``momentum`` is None, the cumulative average), from a batch's mean and biased variance."""
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.to(bn.running_mean), factor)
    bn.running_var.lerp_((var * (count / max(count - 1, 1))).to(bn.running_var), factor)


def _bn_statistics(bn: nn.BatchNorm1d, batch: bool, mean: Tensor | None, var: Tensor | None) -> tuple[Tensor, Tensor]:
    """The (mean, biased variance) a batch norm normalises with: the batch's or the running ones."""
    if batch:
        assert mean is not None and var is not None
        return mean, var
    assert bn.running_mean is not None and bn.running_var is not None, "no running statistics to use"
    return bn.running_mean, bn.running_var


class SimBlock(nn.Module):
    """Residual block: Linear-BN-ReLU-Linear-BN-ReLU, plus the input (or its Linear+ReLU projection when
    the width changes). The ReLU sits before the addition, as in SimFormer's block."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.bn1 = nn.BatchNorm1d(out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.bn2 = nn.BatchNorm1d(out_dim)
        self.project = nn.Linear(in_dim, out_dim) if in_dim != out_dim else None

    def forward(self, x: Tensor, stats: str = "auto") -> Tensor:
        residual = x if self.project is None else F.relu(self.project(x))
        y = F.relu(_norm(self.bn1, self.fc1(x), stats))
        y = F.relu(_norm(self.bn2, self.fc2(y), stats))
        return y + residual


class SimNet(nn.Module):
    """Pixel-pair similarity network: ``[f_i; f_j]`` (N x 2*in_dim) -> P(same class) (N).

    SimFormer writes it with 1x1 convolutions and BatchNorm2d over a B x 2D x J x J grid. A 1x1 convolution
    is a Linear layer applied at every position, and BatchNorm2d pools its statistics over batch and both
    spatial axes, i.e. over every pair: on a flat N x 2D batch of pairs, Linear + BatchNorm1d is the same
    function with the same parameters, and needs no fake spatial layout.

    Two ways to run it, one function: :meth:`logits` / :meth:`forward` take explicit pair vectors (the
    reference implementation), :meth:`pair_logits` / :meth:`pair_probs` take two point sets and evaluate
    all J x K ordered pairs without building them (what the losses use; see :meth:`pair_logits`).
    """

    def __init__(self, in_dim: int, width: int = 256, blocks: int = 3) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError("SimNet needs at least one residual block")
        dims = [2 * in_dim] + [width] * blocks
        self.blocks = nn.ModuleList(SimBlock(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, 2)
        self._workspace = _Workspace()  # work buffers of pair_logits kept between calls (CPU; see there)

    def logits(self, pairs: Tensor, stats: str = "auto") -> Tensor:
        """Two logits (dissimilar, similar) per pair: ``[..., 2D]`` -> ``[..., 2]``."""
        lead = pairs.shape[:-1]
        x = pairs.reshape(-1, pairs.shape[-1])
        for block in self.blocks:
            x = block(x, stats)
        return self.head(x).reshape(*lead, 2)

    def forward(self, pairs: Tensor, stats: str = "auto") -> Tensor:
        """P(similar) = softmax(logits)[..., 1], in [0, 1]: ``[..., 2D]`` -> ``[...]``."""
        return self.logits(pairs, stats).float().softmax(-1)[..., 1]

    def pair_logits(self, first: Tensor, second: Tensor, stats: str = "auto") -> Tensor:
        """``logits(pair_grid(first, second), stats)`` without the pair grid: ``[..., J, D]`` x
        ``[..., K, D]`` -> ``[..., J, K, 2]``; same values (up to float rounding), gradients and running
        statistics updates.

        Why each step is exact:

        * First Linear layers (``fc1`` and ``project`` of block 0) on ``[f_j; g_k]``: split the weight as
          ``[W_a, W_b]``, then ``W [f_j; g_k] + c = (W_a f_j + c) + W_b g_k``. Two J x W and K x W products
          replace a (J*K) x 2D one, and the J*K x 2D concatenation is never built.
        * Its batch norm: the pre-activations of a grid are ``a_j + b_k``; with ``m_a, m_b, v_a, v_b`` the
          means and (biased) variances of ``a`` over j and ``b`` over k, the grid's mean is ``m_a + m_b``
          and, because the centred cross term sums to zero over a full grid, its variance is ``v_a + v_b``.
          All grids hold J*K pairs, so the batch mean is the mean of the grid means and the batch variance
          the mean of ``v_a + v_b + (m_a + m_b - mean)^2``. The norm is then a per-channel affine map, which
          keeps the sum separable: ``bn(a_j + b_k) = (s a_j + t) + s b_k``. Only the ReLU needs the grid.
        * The rest of the network (ReLU onwards) runs in :class:`_PairTail`, a hand-written forward and
          backward that streams over chunks of grids with reused buffers (see there).
        """
        lead = torch.broadcast_shapes(first.shape[:-2], second.shape[:-2])
        j, k, d = first.shape[-2], second.shape[-2], first.shape[-1]
        first = first.expand(*lead, j, d).reshape(-1, j, d)
        second = second.expand(*lead, k, d).reshape(-1, k, d)
        count = first.shape[0] * j * k

        block = self.blocks[0]
        w_a, w_b = block.fc1.weight.split(d, dim=1)
        a, b = F.linear(first, w_a, block.fc1.bias), F.linear(second, w_b)  # L x J x W, L x K x W
        batch, update = _bn_mode(block.bn1, stats)
        mean = var = None
        if batch:
            grid_mean = a.mean(1) + b.mean(1)  # L x W
            mean = grid_mean.mean(0)
            var = (a.var(1, correction=0) + b.var(1, correction=0) + (grid_mean - mean).square()).mean(0)
            if update:
                _update_running(block.bn1, mean.detach(), var.detach(), count)
        mean, var = _bn_statistics(block.bn1, batch, mean, var)
        scale = block.bn1.weight * torch.rsqrt(var + block.bn1.eps)
        a, b = a * scale + (block.bn1.bias - mean * scale), b * scale

        if block.project is not None:  # residual relu(project([f; g])), split the same way
            p_a, p_b = block.project.weight.split(d, dim=1)
            res_a, res_b, res_relu = F.linear(first, p_a, block.project.bias), F.linear(second, p_b), True
        else:  # identity residual [f; g] = [f; 0] + [0; g]
            res_a, res_b, res_relu = F.pad(first, (0, d)), F.pad(second, (d, 0)), False

        layers = [(block.fc2, block.bn2)] + [(fc, bn) for blk in self.blocks[1:] for fc, bn in ((blk.fc1, blk.bn1), (blk.fc2, blk.bn2))]
        modes = [_bn_mode(bn, stats) for _, bn in layers]
        params = [p for fc, bn in layers for p in (fc.weight, fc.bias, bn.weight, bn.bias)]
        params += [self.head.weight, self.head.bias]
        inputs = [a, b, res_a, res_b, *params]
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        workspace = self._workspace if a.device.type == "cpu" else None
        spec = _TailSpec([bn for _, bn in layers], modes, res_relu, keep, workspace)
        out = _PairTail.apply(spec, *inputs)
        return out.view(*lead, j, k, 2)

    def pair_probs(self, first: Tensor, second: Tensor, stats: str = "auto") -> Tensor:
        """P(similar) of all pairs ``[first_j; second_k]``: ``[..., J, D]`` x ``[..., K, D]`` -> ``[..., J, K]``."""
        return self.pair_logits(first, second, stats).float().softmax(-1)[..., 1]


# --- SimNet on pair grids: the streamed tail ---------------------------------------------------------------

# Rows (pairs) per chunk on CPU: large enough to keep per-call Python overhead small, small enough that the
# few chunk-sized scratch tiles (rows x width floats each) stay in cache between the ops of one chunk.
_CHUNK_ROWS = 8192


class _Workspace:
    """Large work buffers handed back by one :class:`_PairTail` evaluation for the next one to reuse.

    Freshly allocated memory costs a page fault per 4 KB page when first written: on CPU that is about as
    long as one of the tail's matrix products per N x W buffer, and PyTorch has no caching allocator on CPU
    (an 80 MB tensor goes back to the OS when freed). Training calls the tail with the same shapes every
    step, so the buffers of the last calls are kept (6 N x W buffers for SimLoss, 2 for the teacher: about
    650 MB at 16 pairs, J = 100, width 64; less than the pair-grid implementation's peak). A buffer is
    only handed back once nothing reads it any more: at the end of a forward pass without gradient, at the
    end of the backward pass otherwise; a graph dropped without backward simply frees its buffers. Only
    buffers of the last shape are kept, and copies and pickles of the module start empty.
    """

    def __init__(self) -> None:
        self.free: list[Tensor] = []

    def take(self, rows: int, width: int, like: Tensor) -> Tensor:
        for i, buffer in enumerate(self.free):
            if buffer.shape == (rows, width) and buffer.dtype == like.dtype and buffer.device == like.device:
                return self.free.pop(i)
        return like.new_empty(rows, width)

    def give(self, buffers: Sequence[Tensor]) -> None:
        shape = buffers[0].shape
        self.free = [b for b in self.free if b.shape == shape] + list({id(b): b for b in buffers}.values())

    def __deepcopy__(self, memo: dict) -> _Workspace:
        return _Workspace()

    def __getstate__(self) -> dict:
        return {"free": []}


class _TailSpec(NamedTuple):
    """Non-tensor arguments of :class:`_PairTail`."""

    norms: list[nn.BatchNorm1d]  # the tail's batch norms, layer order (for eps and running statistics)
    modes: list[tuple[bool, bool]]  # per layer: (batch statistics?, update running statistics?)
    residual_relu: bool  # block 0's residual is relu(project(x)) (else the identity)
    keep: bool  # keep every layer's pre-activation for the backward pass
    workspace: _Workspace | None  # where the N x W buffers come from and go back to (None: allocate)


class _PairTail(torch.autograd.Function):
    """SimNet from block 0's first ReLU to the head logits, on L grids of J x K pairs (N = L*J*K rows).

    Inputs: ``a`` (L x J x W) and ``b`` (L x K x W), block 0's normalised first layer, split as in
    :meth:`SimNet.pair_logits` (hidden ``h0 = relu(a_j + b_k)``); ``res_a``, ``res_b``, its residual split
    the same way (``r = relu(res_a_j + res_b_k)``, no ReLU for an identity residual); then, per tail layer
    (block 0's fc2/bn2, then fc1/bn1 and fc2/bn2 of every further block), ``weight, bias, gamma, beta``;
    then the head's ``weight, bias``. Output: N x 2 logits, grid-major (row ``(l * J + j) * K + k``).

    The layers are ``z_n = W_n x_n + c_n``, ``y_n = relu(bn_n(z_n))``. Layer 0's input is ``h0``; an odd
    layer (a block's fc1) reads the residual stream ``x``, an even layer >= 2 (its fc2) reads the previous
    layer's ``y``. The stream starts at ``r`` and every even layer adds its ``y`` to it; the head reads it.

    This is the same arithmetic as ``SimNet.logits`` on the pair rows; what differs is how it is scheduled,
    because at training scale (N = 320k pairs, W = 64) every N x W tensor is 80 MB and the cost is fresh
    memory and passes over it rather than arithmetic:

    * Work goes through the rows chunk by chunk (whole grids), each chunk's elementwise ops on small scratch
      tiles that stay in cache. Batch norm needs its statistics over all rows before normalising, so each
      layer takes one pass that stores its pre-activations ``z_n`` (N x W) and collects their per-chunk mean
      and centred sum of squares, merged exactly at the end (Chan et al.'s pairwise formula); the next pass
      normalises them on the fly.
    * Nothing else N x W is stored: ``h0`` and ``r`` are rebuilt from the J x W / K x W inputs, ``y_n``
      from ``z_n``, and the stream from ``r`` and the ``y`` of the even layers, in the same order of
      operations as in the forward pass (so with the same float values).
    * Forward without gradient (the distillation teacher) keeps one ``z`` buffer (each pass overwrites the
      rows it has read) and the stream: 2 x N x W. With gradient, all ``z_n`` and the stream's buffer, which
      the backward pass reuses for the stream's gradient; backward stores each fc1's input gradient in the
      ``z`` buffer of the layer above it, which is dead by then. No N x W tensor is allocated in backward.
    * Backward of BatchNorm+ReLU is written out: with ``s = gamma / sigma``, ``xh = (z - mu) / sigma`` and
      ``du = dy * [y > 0]``, ``dz = s * (du - mean(du) - xh * mean(du * xh))`` (batch statistics; the last
      two terms are the statistics' own gradients, absent with running statistics),
      ``dgamma = sum(du * xh)``, ``dbeta = sum(du)``. Those two sums are global, so they are collected in the
      pass of the layer above, and ``dz`` is formed in the layer's own pass.
    """

    @staticmethod
    def forward(ctx: Any, spec: _TailSpec, a: Tensor, b: Tensor, res_a: Tensor, res_b: Tensor, *params: Tensor) -> Tensor:
        tail = _Tail(spec, a, b, res_a, res_b, params)
        logits = tail.forward()
        if spec.keep:
            ctx.save_for_backward(a, b, res_a, res_b, *params)
            ctx.tail = tail
        return logits

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        tail = getattr(ctx, "tail", None)
        if tail is None:
            raise RuntimeError("backward through the pair SimNet twice (or after a forward without gradient)")
        ctx.tail = None  # its buffers are overwritten by the backward pass
        return (None, *tail.backward(grad))


class _Tail:
    """One evaluation of :class:`_PairTail`: geometry, buffers and the batch-norm constants of each layer.

    Layer ``n`` stores ``z_n - c_n`` (the product without the Linear bias ``c_n``): batch norm subtracts a
    mean anyway, so the bias only enters the per-channel constants (``center`` below), and the product is a
    plain ``mm`` with no pass to broadcast the bias into its output.
    """

    def __init__(
        self, spec: _TailSpec, a: Tensor, b: Tensor, res_a: Tensor, res_b: Tensor, params: Sequence[Tensor]
    ) -> None:
        self.spec = spec
        self.a, self.b, self.res_a, self.res_b = a, b, res_a, res_b
        self.num_layers = len(spec.norms)
        self.weight = list(params[0:-2:4])
        self.bias = list(params[1:-2:4])
        self.gamma = list(params[2:-2:4])
        self.beta = list(params[3:-2:4])
        self.head_weight, self.head_bias = params[-2], params[-1]
        grids, self.j, width = a.shape
        self.k = b.shape[1]
        self.grid_rows = self.j * self.k
        self.rows = grids * self.grid_rows
        per = max(1, _CHUNK_ROWS // self.grid_rows) if a.device.type == "cpu" else grids
        self.chunks = [(g, min(g + per, grids)) for g in range(0, grids, per)]
        self.tiles = [a.new_empty(min(per, grids) * self.grid_rows, width) for _ in range(3)]
        # Per layer, set by the forward pass: y = relu(z * scale + shift) and xh = z * inv + offset, for the
        # stored z (bias excluded).
        self.scale: list[Tensor] = []
        self.shift: list[Tensor] = []
        self.inv: list[Tensor] = []
        self.offset: list[Tensor] = []
        self.z: list[Tensor] = []
        self.stream: Tensor | None = None

    # -- chunk helpers --

    def _span(self, chunk: tuple[int, int]) -> slice:
        return slice(chunk[0] * self.grid_rows, chunk[1] * self.grid_rows)

    def _tile(self, index: int, chunk: tuple[int, int]) -> Tensor:
        return self.tiles[index][: (chunk[1] - chunk[0]) * self.grid_rows]

    def _grid_sum(self, left: Tensor, right: Tensor, chunk: tuple[int, int], out: Tensor, relu: bool) -> Tensor:
        """``left_j + right_k`` (optionally ReLU'd) for the chunk's grids, written to ``out`` (rows x W)."""
        g0, g1 = chunk
        torch.add(left[g0:g1].unsqueeze(2), right[g0:g1].unsqueeze(1), out=out.view(g1 - g0, self.j, self.k, -1))
        return out.relu_() if relu else out

    def _grid_reduce(self, grad: Tensor, chunk: tuple[int, int], d_left: Tensor, d_right: Tensor) -> None:
        """Backward of :meth:`_grid_sum` without the ReLU: ``grad`` summed over k, and over j."""
        g0, g1 = chunk
        grid = grad.view(g1 - g0, self.j, self.k, -1)
        torch.sum(grid, 2, out=d_left[g0:g1])
        torch.sum(grid, 1, out=d_right[g0:g1])

    def _activation(self, n: int, chunk: tuple[int, int], out: Tensor) -> Tensor:
        """``y_n = relu(bn_n(z_n))`` of the chunk."""
        return torch.addcmul(self.shift[n], self.z[n][self._span(chunk)], self.scale[n], out=out).relu_()

    def _normalised(self, n: int, chunk: tuple[int, int], out: Tensor) -> Tensor:
        """``xh_n = (z_n - mean) / sigma`` of the chunk."""
        return torch.addcmul(self.offset[n], self.z[n][self._span(chunk)], self.inv[n], out=out)

    def _relu_grad(self, n: int, chunk: tuple[int, int], dy: Tensor, out: Tensor) -> Tensor:
        """``dy * [y_n > 0]`` for the chunk: ReLU's own backward kernel (one pass, no mask tensor) on the
        pre-activation, computed exactly as in the forward pass."""
        u = torch.addcmul(self.shift[n], self.z[n][self._span(chunk)], self.scale[n], out=out)
        return torch.ops.aten.threshold_backward.grad_input(dy, u, 0.0, grad_input=out)

    def _stream_at(self, upto: int, chunk: tuple[int, int], out: Tensor, scratch: Tensor) -> Tensor:
        """The residual stream after (even) layer ``upto``, rebuilt with the forward pass's operations."""
        self._grid_sum(self.res_a, self.res_b, chunk, out, self.spec.residual_relu)
        for n in range(0, upto + 1, 2):
            out.add_(self._activation(n, chunk, scratch))
        return out

    def _input(self, n: int, chunk: tuple[int, int], out: Tensor, scratch: Tensor) -> Tensor:
        """Layer ``n``'s input for the chunk, rebuilt in ``out``."""
        if n == 0:
            return self._grid_sum(self.a, self.b, chunk, out, relu=True)
        if n % 2 == 1:
            return self._stream_at(n - 1, chunk, out, scratch)
        return self._activation(n - 1, chunk, out)

    # -- forward --

    def forward(self) -> Tensor:
        width, layers, rows = self.a.shape[-1], self.num_layers, self.rows
        stream = self._buffer()
        if self.spec.keep:
            self.z = [self._buffer() for _ in range(layers)]
        else:  # one buffer: each pass overwrites the rows it has just read
            self.z = [self._buffer()] * layers
        logits = self.a.new_empty(rows, 2)
        for n in range(layers + 1):  # n == layers: the head
            chunk_stats = []
            for chunk in self.chunks:
                span = self._span(chunk)
                if n == 0:
                    x = self._grid_sum(self.a, self.b, chunk, self._tile(0, chunk), relu=True)
                else:
                    y = self._activation(n - 1, chunk, self._tile(0, chunk))
                    if n % 2 == 1:  # a block's input, or the head's: add y to the stream
                        x = stream[span]
                        if n == 1:
                            self._grid_sum(self.res_a, self.res_b, chunk, x, self.spec.residual_relu)
                        x = x.add_(y)
                    else:
                        x = y
                if n == layers:
                    torch.addmm(self.head_bias, x, self.head_weight.t(), out=logits[span])
                    continue
                z = torch.mm(x, self.weight[n].t(), out=self.z[n][span])
                if self.spec.modes[n][0]:
                    # Mean and biased variance of the chunk's columns in one pass (batch norm's own kernel).
                    mean, var = torch.ops.aten.batch_norm_update_stats(z, None, None, 0.0)
                    chunk_stats.append((z.shape[0], mean, var))
            if n < layers:
                self._set_norm(n, chunk_stats)
        self.stream = stream
        if not self.spec.keep:
            self._release()
        return logits

    def _buffer(self) -> Tensor:
        workspace, width = self.spec.workspace, self.a.shape[-1]
        return self.a.new_empty(self.rows, width) if workspace is None else workspace.take(self.rows, width, self.a)

    def _release(self) -> None:
        """Hand the N x W buffers back to the workspace (nothing reads them any more)."""
        if self.spec.workspace is not None and self.stream is not None:
            self.spec.workspace.give([self.stream, *self.z])
        self.z, self.stream = [], None

    def _set_norm(self, n: int, chunk_stats: list[tuple[int, Tensor, Tensor]]) -> None:
        """Layer ``n``'s normalisation constants from its chunks' (count, mean, variance), merged exactly:
        total sum of squares = sum of the chunks' + sum of count * (chunk mean - mean)^2."""
        bn, (batch, update) = self.spec.norms[n], self.spec.modes[n]
        if batch:
            center = sum(m * (c / self.rows) for c, m, _ in chunk_stats)  # mean of z without its bias
            var = sum((v + (m - center).square()) * (c / self.rows) for c, m, v in chunk_stats)
            if update:
                _update_running(bn, center + self.bias[n], var, self.rows)
        else:
            mean, var = _bn_statistics(bn, False, None, None)
            center = mean - self.bias[n]
        inv = torch.rsqrt(var + bn.eps)
        scale = self.gamma[n] * inv
        self.inv.append(inv)
        self.offset.append(-center * inv)
        self.scale.append(scale)
        self.shift.append(self.beta[n] - center * scale)

    # -- backward --

    def backward(self, grad: Tensor) -> list[Tensor]:
        layers, stream, top = self.num_layers, self.stream, self.num_layers - 1
        assert stream is not None
        grad = grad.contiguous()
        d_weight = [torch.zeros_like(w) for w in self.weight]
        d_bias = [torch.zeros_like(c) for c in self.bias]
        d_gamma = [torch.zeros_like(g) for g in self.gamma]
        d_beta = [torch.zeros_like(g) for g in self.beta]
        d_head_weight, d_head_bias = torch.zeros_like(self.head_weight), torch.zeros_like(self.head_bias)
        d_a, d_b = torch.empty_like(self.a), torch.empty_like(self.b)
        d_res_a, d_res_b = torch.empty_like(self.res_a), torch.empty_like(self.res_b)
        d_stream = stream  # the stream's gradient overwrites the stream, chunk by chunk, once it is read

        def collect(n: int, chunk: tuple[int, int], du: Tensor) -> None:
            """Layer n's global sums: dbeta = sum(du), dgamma = sum(du * xh)."""
            d_beta[n] += du.sum(0)
            d_gamma[n] += self._normalised(n, chunk, self._tile(2, chunk)).mul_(du).sum(0)

        # Head, logits = W_h x + c_h on the final stream; then the top layer's sums.
        for chunk in self.chunks:
            span = self._span(chunk)
            rows, x = grad[span], stream[span]
            d_head_weight.addmm_(rows.t(), x)
            d_head_bias += rows.sum(0)
            dx = torch.mm(rows, self.head_weight, out=d_stream[span])
            collect(top, chunk, self._relu_grad(top, chunk, dx, self._tile(1, chunk)))

        # Layer n's pass: dz_n (its sums are complete), dW_n, its input's gradient, layer n-1's sums. The
        # gradient of layer n-1's pre-activation goes to z_n's rows, which this pass has just consumed.
        for n in range(top, -1, -1):
            scale = self.scale[n]
            if self.spec.modes[n][0]:  # dz = scale * du - scale * mean(du) - xh * scale * mean(du * xh)
                const, slope = -scale * d_beta[n] / self.rows, -scale * d_gamma[n] / self.rows
            else:  # running statistics are constants: dz = scale * du
                const, slope = torch.zeros_like(scale), torch.zeros_like(scale)
            for chunk in self.chunks:
                span = self._span(chunk)
                if n == top:
                    du = self._relu_grad(n, chunk, d_stream[span], self._tile(1, chunk))
                else:
                    du = self.z[n + 1][span]
                dz = self._normalised(n, chunk, self._tile(0, chunk))
                dz = torch.addcmul(const, dz, slope, out=dz).addcmul_(du, scale)
                x = self._input(n, chunk, self._tile(2, chunk), self._tile(1, chunk))
                d_weight[n].addmm_(dz.t(), x)
                d_bias[n] += dz.sum(0)
                if n == 0:  # input h0 = relu(a_j + b_k); the stream's start r = relu(res_a_j + res_b_k)
                    dh = torch.mm(dz, self.weight[n], out=self._tile(1, chunk))
                    self._grid_reduce(torch.ops.aten.threshold_backward.grad_input(dh, x, 0.0, grad_input=dh), chunk, d_a, d_b)
                    dr = d_stream[span]
                    if self.spec.residual_relu:
                        r = self._grid_sum(self.res_a, self.res_b, chunk, self._tile(0, chunk), relu=True)
                        dr = torch.ops.aten.threshold_backward.grad_input(dr, r, 0.0, grad_input=r)
                    self._grid_reduce(dr, chunk, d_res_a, d_res_b)
                elif n % 2 == 1:  # input: the stream, whose gradient gains this branch's
                    dx = d_stream[span].addmm_(dz, self.weight[n])
                    collect(n - 1, chunk, self._relu_grad(n - 1, chunk, dx, self.z[n][span]))
                else:  # input: y_{n-1} = x
                    dy = torch.mm(dz, self.weight[n], out=self._tile(1, chunk))
                    du_below = torch.ops.aten.threshold_backward.grad_input(dy, x, 0.0, grad_input=self.z[n][span])
                    collect(n - 1, chunk, du_below)

        self._release()
        param_grads = [g for n in range(layers) for g in (d_weight[n], d_bias[n], d_gamma[n], d_beta[n])]
        return [d_a, d_b, d_res_a, d_res_b, *param_grads, d_head_weight, d_head_bias]


# --- point sampling --------------------------------------------------------------------------------------


def sample_points(
    region: Tensor, num: int, generator: torch.Generator | None = None, jitter: float = 0.1
) -> tuple[Tensor, Tensor]:
    """SimFormer's point sampler: top-``num`` of ``region + U(0, jitter)`` in each map.

    ``region`` bool ``B x h x w``. Points inside the region score >= 1 and outside < ``jitter`` < 1, so a
    region with >= ``num`` pixels yields ``num`` distinct points uniformly at random inside it (the top-k of
    i.i.d. uniforms is a uniform random subset); a smaller region yields all its pixels, topped up with
    uniformly random pixels outside it. ``generator`` must live on ``region``'s device.

    Returns ``(index, coords)``: ``index`` long ``B x num``, flat positions ``y * w + x``; ``coords`` float
    ``B x num x 2``, the same points as (x, y) in [-1, 1] for ``F.grid_sample(..., align_corners=True)``.
    At these integer grid positions bilinear sampling (align_corners=True) equals a gather, which is what
    :func:`gather_points` does when maps have the mask-feature size.
    """
    b, h, w = region.shape
    if num > h * w:
        raise ValueError(f"cannot sample {num} distinct points from a {h}x{w} map")
    noise = torch.rand(region.shape, generator=generator, device=region.device) * jitter
    score = (region.float() + noise).reshape(b, h * w)
    index = score.topk(num, dim=1).indices
    return index, point_coords(index, h, w)


def point_coords(index: Tensor, h: int, w: int) -> Tensor:
    """Flat positions ``[..., K]`` on an h x w grid -> (x, y) in [-1, 1] (align_corners=True), ``[..., K, 2]``."""
    x = (index % w).float() * (2.0 / max(w - 1, 1)) - 1.0
    y = torch.div(index, w, rounding_mode="floor").float() * (2.0 / max(h - 1, 1)) - 1.0
    return torch.stack([x, y], dim=-1)


def gather_points(maps: Tensor, image: Tensor, index: Tensor) -> Tensor:
    """Values of ``maps`` (``B x C x h x w``) at flat positions ``index`` of images ``image``.

    ``image`` long ``[...]`` (batch indices) and ``index`` long ``[..., K]`` -> ``[..., K, C]``. One advanced
    index on the ``B x C x (h*w)`` view: no copy of whole maps (per pair or channels-last).
    """
    return maps.flatten(2)[image.unsqueeze(-1), :, index]


def sample_bilinear(maps: Tensor, image: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of ``maps`` at normalised (x, y) ``coords`` ``[P, S, K, 2]`` of images ``image``
    ``[P, S]`` (align_corners=True) -> ``[P, S, K, C]``. Used when a map is not at the mask-feature size."""
    p, s, k, _ = coords.shape
    selected = maps[image.reshape(-1)]
    out = F.grid_sample(selected, coords.reshape(p * s, k, 1, 2), mode="bilinear", align_corners=True)
    return out.squeeze(-1).transpose(1, 2).reshape(p, s, k, -1)


# --- class-balanced weights ------------------------------------------------------------------------------


class BalancedWeights(nn.Module):
    """Running positive / negative pair counts over the last ``window`` iterations (SimFormer's
    ``BalanceBinaryWeightManager``): ``w_pos = N / (P + N)``, ``w_neg = P / (P + N)``.

    The history starts with one entry (1 positive, 1 negative), as SimFormer's deques; once ``window``
    updates have been made that entry has rolled out. The ring buffer and its cursor are tensors updated in
    place on the loss device, so an update costs no host synchronisation, and both are saved in the state
    dict (a resumed run continues with the same weights). What is counted is the caller's choice;
    :class:`PixelSimilarityLoss` counts all valid pairs of the step (see the module docstring).
    """

    history: Tensor
    cursor: Tensor

    def __init__(self, window: int = 25) -> None:
        super().__init__()
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        history = torch.zeros(window, 2)  # columns: positives, negatives
        history[0] = 1.0
        self.register_buffer("history", history)
        self.register_buffer("cursor", torch.tensor(1 % window, dtype=torch.int64))

    @torch.no_grad()
    def update(self, positives: Tensor | float, negatives: Tensor | float) -> None:
        row = torch.stack([torch.as_tensor(positives), torch.as_tensor(negatives)]).to(self.history)
        self.history.index_copy_(0, self.cursor.view(1), row.view(1, 2))
        self.cursor.add_(1).remainder_(self.window)

    def weights(self) -> tuple[Tensor, Tensor]:
        """``(w_pos, w_neg)``: the rarer label gets the larger weight; they sum to 1."""
        pos, neg = self.history.sum(0).unbind()
        total = pos + neg
        return neg / total, pos / total


# --- loss pieces -----------------------------------------------------------------------------------------


def pair_grid(first: Tensor, second: Tensor) -> Tensor:
    """All ordered pairs ``[first_j; second_k]``: ``[..., J, D]`` x ``[..., K, D]`` -> ``[..., J, K, 2D]``."""
    j, k = first.shape[-2], second.shape[-2]
    a = first.unsqueeze(-2).expand(*first.shape[:-1], k, first.shape[-1])
    b = second.unsqueeze(-3).expand(*second.shape[:-2], j, k, second.shape[-1])
    return torch.cat([a, b], dim=-1)


def distill_loss_map(teacher: Tensor, student: Tensor, kind: str) -> Tensor:
    """Elementwise distillation loss between teacher and student similarities in [0, 1].

    ``"ce"``: both clamped to [0.01, 0.99], ``-t log s - (1 - t) log(1 - s)``.
    ``"cce"`` (threshold 0.5): ``-ReLU(t - 0.5) log(1 + s) - ReLU(0.5 - t) log(2 - s)``; only the side of
    0.5 the teacher is on pulls the student, with a bounded (log 2) reward instead of an unbounded penalty.
    """
    if kind == "ce":
        t = teacher.clamp(_LOG_CLAMP, 1 - _LOG_CLAMP)
        s = student.clamp(_LOG_CLAMP, 1 - _LOG_CLAMP)
        return -t * s.log() - (1 - t) * (1 - s).log()
    if kind == "cce":
        return -F.relu(teacher - 0.5) * torch.log1p(student) - F.relu(0.5 - teacher) * torch.log(2 - student)
    raise ValueError(f"distill_loss must be 'ce' or 'cce', not {kind!r}")


def class_hot(targets: Sequence[dict[str, Tensor]], num_classes: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Crop-level class presence from the targets: ``(base, novel)`` bool ``B x K``.

    Base = mask-carrying targets, novel = mask-less targets (image-level labels). Built with scatters, so
    no host synchronisation on the loss device.
    """
    base = torch.zeros(len(targets), num_classes, device=device)
    novel = torch.zeros(len(targets), num_classes, device=device)
    for b, t in enumerate(targets):
        labels = t["labels"].to(device)
        has = t["has_mask"].to(device)
        base[b].scatter_(0, labels, has.float())
        novel[b].scatter_(0, labels, (~has).float())
    return base.bool(), novel.bool()


# --- the loss module -------------------------------------------------------------------------------------


class PixelSimilarityLoss(nn.Module):
    """SimLoss + DistLoss of SimFormer, with the SimNet they share (see the module docstring).

    ``forward(mask_features, pred_logits, pred_masks, batch)`` uses the final decoder layer's outputs and
    the batch keys ``pairs`` (P x 2; when absent and ``cfg.pairing == "self"``, every image is paired with
    itself), ``labels``, ``pad_mask``, ``targets`` and ``novel_ids``. Labels and padding are nearest-
    downsampled to the mask-feature size (as SimFormer does with its GT map).

    SimLoss, per pair (a, b): if the crops share base classes (from the targets), one is drawn uniformly
    as c* and the positive region of each image is its c* pixels; otherwise the whole base region. Each
    image gets ``int(positive_fraction * J)`` points in its positive region and the rest in
    (not padding) and (not positive); label 1[label_i == label_j]; valid if at least one pixel is base;
    loss = sum(w_y * CE * v) / sum(v) over the pair's J x J (x 2 directions) pairs, with class-balanced
    weights w_y from :class:`BalancedWeights` (updated in training mode only).

    DistLoss, for pairs whose crops share a novel class (mask-less targets): ``novel_points`` points per
    image in the non-base region (padding excluded unless ``distill_padding``); teacher
    t = SimNet([f_i; f_j]) without gradient; student s = ReLU(cos(S(i), S(j))) with
    S[c] = sum_q softmax(cls_q)[c] * sigmoid(mask_q) over the split's novel classes c, sampled at the
    points; mean of :func:`distill_loss_map` over the pair's J x J (x 2) pairs, 0 for other pairs.
    """

    def __init__(
        self,
        cfg: SimilarityConfig,
        embed_dim: int,
        teacher_bn: str = "batch",
        distill_padding: bool = False,
    ) -> None:
        super().__init__()
        if teacher_bn not in ("batch", "running"):
            raise ValueError(f"teacher_bn must be 'batch' or 'running', not {teacher_bn!r}")
        if cfg.distill_loss not in ("ce", "cce"):
            raise ValueError(f"similarity.distill_loss must be 'ce' or 'cce', not {cfg.distill_loss!r}")
        if not 0.0 < cfg.positive_fraction < 1.0:
            raise ValueError("similarity.positive_fraction must lie in (0, 1)")
        self.cfg = cfg
        self.teacher_bn = teacher_bn
        self.distill_padding = distill_padding
        self.simnet = SimNet(embed_dim, cfg.simnet_width, cfg.simnet_blocks)
        self.balance = BalancedWeights(cfg.balance_window)
        # Detached diagnostics of the last call (logging only; not losses).
        self.metrics: dict[str, Tensor] = {}

    def forward(
        self,
        mask_features: Tensor,
        pred_logits: Tensor,
        pred_masks: Tensor,
        batch: dict[str, Any],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        device = mask_features.device
        b, _, h, w = mask_features.shape
        pairs = batch.get("pairs")
        if pairs is None:
            if self.cfg.pairing != "self":
                raise KeyError("batch has no 'pairs' (needed for cross-image pixel similarity)")
            pairs = torch.arange(b).unsqueeze(1).expand(b, 2)
        pairs = pairs.to(device)
        novel_ids = batch["novel_ids"].to(device)

        labels = nearest_downsample(batch["labels"].to(device), (h, w)).reshape(b, h * w)
        pad = nearest_downsample(batch["pad_mask"].to(device), (h, w)).reshape(b, h * w)
        base = (labels != IGNORE_LABEL) & ~torch.isin(labels, novel_ids)
        base_hot, novel_hot = class_hot(batch["targets"], pred_logits.shape[-1] - 1, device)

        is_self = pairs[:, 0] == pairs[:, 1]
        # Direction d of pair p pairs side d's points with side 1-d's; for a self pair the second direction
        # repeats the first and is masked out.
        directions = torch.stack([torch.ones_like(is_self), ~is_self], dim=1)  # P x 2
        view = _PairView(pairs, is_self, directions, labels, pad, base, h, w)

        loss_sim = self._sim_loss(mask_features, view, base_hot, generator)
        loss_distill = self._distill_loss(mask_features, pred_logits, pred_masks, view, novel_hot, novel_ids, generator)
        return {"loss_sim": loss_sim, "loss_distill": loss_distill}

    # -- SimLoss --

    def _sim_loss(
        self, mask_features: Tensor, view: _PairView, base_hot: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        num_points = self.cfg.base_points
        num_pos = int(num_points * self.cfg.positive_fraction)
        pairs, h, w = view.pairs, view.h, view.w
        p = pairs.shape[0]

        # c*: uniform among the base classes both crops carry (argmax of uniforms restricted to them).
        common = base_hot[pairs[:, 0]] & base_hot[pairs[:, 1]]  # P x K
        draw = torch.rand(common.shape, generator=generator, device=common.device)
        chosen = torch.where(common, draw, -1.0).argmax(1)  # P
        has_common = common.any(1)

        side_labels = view.labels[pairs]  # P x 2 x hw
        positive = torch.where(has_common[:, None, None], side_labels == chosen[:, None, None], view.base[pairs])
        negative = ~view.pad[pairs] & ~positive
        pos_index, _ = sample_points(positive.reshape(2 * p, h, w), num_pos, generator)
        neg_index, _ = sample_points(negative.reshape(2 * p, h, w), num_points - num_pos, generator)
        index = torch.cat([pos_index, neg_index], dim=1).reshape(p, 2, num_points)
        index = _share_self(index, view.is_self)

        feats = gather_points(mask_features.detach(), pairs, index)  # P x 2 x J x D
        point_labels = view.labels[pairs.unsqueeze(-1), index]  # P x 2 x J
        point_base = view.base[pairs.unsqueeze(-1), index]

        other = [1, 0]  # direction d pairs side d with side 1 - d
        logits = self.simnet.pair_logits(feats, feats[:, other]).float()  # P x 2 x J x J x 2
        target = point_labels.unsqueeze(-1) == point_labels[:, other].unsqueeze(-2)  # P x 2 x J x J
        valid = point_base.unsqueeze(-1) | point_base[:, other].unsqueeze(-2)  # OR: >= 1 base pixel
        valid = valid & view.directions[:, :, None, None]

        if self.training:
            self.balance.update((target & valid).sum(), (~target & valid).sum())
        w_pos, w_neg = self.balance.weights()
        # BCE(softmax(logits)[1], y) computed as the 2-way cross-entropy of the logits: same value, stable.
        ce = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1).long(), reduction="none").view_as(target)
        weighted = torch.where(target, w_pos, w_neg) * ce
        num = torch.where(valid, weighted, 0.0).flatten(1).sum(1)
        den = valid.flatten(1).sum(1).clamp(min=_EPS)

        with torch.no_grad():
            hit = (logits[..., 1] > logits[..., 0]) == target
            self.metrics = {
                "simnet_acc": (hit & valid).sum() / valid.sum().clamp(min=1),
                "simnet_w_pos": w_pos.detach(),
            }
        return (num / den).mean()

    # -- DistLoss --

    def _distill_loss(
        self,
        mask_features: Tensor,
        pred_logits: Tensor,
        pred_masks: Tensor,
        view: _PairView,
        novel_hot: Tensor,
        novel_ids: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        if novel_ids.numel() == 0:  # oracle / fully supervised batches: nothing to distil
            return (pred_logits.sum() + pred_masks.sum()) * 0.0
        num_points = self.cfg.novel_points
        pairs, h, w = view.pairs, view.h, view.w
        p = pairs.shape[0]
        shares = (novel_hot[pairs[:, 0]] & novel_hot[pairs[:, 1]]).any(1)  # P

        region = ~view.base if self.distill_padding else ~view.base & ~view.pad
        index, _ = sample_points(region[pairs].reshape(2 * p, h, w), num_points, generator)
        index = _share_self(index.reshape(p, 2, num_points), view.is_self)
        other = [1, 0]

        with torch.no_grad():
            feats = gather_points(mask_features.detach(), pairs, index)
            stats = "batch" if (self.training and self.teacher_bn == "batch") else "running"
            teacher = self.simnet.pair_probs(feats, feats[:, other], stats=stats)  # P x 2 x J x J

        # Student: sigmoid(mask) at the points, mixed by the novel-class probabilities. Bilinear sampling is
        # linear, so sampling sigmoid(masks) and then mixing equals sampling the score map S. At the
        # mask-feature size the points are grid positions: gather, then sigmoid (J values per query, not the
        # whole map). Other sizes: sigmoid at mask resolution, then bilinear sampling.
        if tuple(pred_masks.shape[-2:]) == (h, w):
            mask_probs = gather_points(pred_masks, pairs, index).float().sigmoid()  # P x 2 x J x Q
        else:
            mask_probs = sample_bilinear(pred_masks.float().sigmoid(), pairs, point_coords(index, h, w))
        probs = pred_logits.float().softmax(-1)[..., novel_ids]  # B x Q x N
        scores = torch.einsum("psjq,psqn->psjn", mask_probs, probs[pairs])
        unit = F.normalize(scores, dim=-1, eps=1e-8)
        student = F.relu(unit @ unit[:, other].transpose(-1, -2))  # P x 2 x J x J

        loss = distill_loss_map(teacher, student, self.cfg.distill_loss)
        active = (shares[:, None] & view.directions)[:, :, None, None]
        per_pair = torch.where(active, loss, 0.0).flatten(1).sum(1)
        per_pair = per_pair / (view.directions.sum(1) * num_points * num_points)
        self.metrics["distill_pair_share"] = shares.float().mean().detach()
        return per_pair.mean()


class _PairView(NamedTuple):
    """What both losses need of the batch, at the mask-feature size (``hw = h * w``)."""

    pairs: Tensor  # P x 2 batch indices
    is_self: Tensor  # P, pair (b, b)
    directions: Tensor  # P x 2, which of the two pairing directions count
    labels: Tensor  # B x hw
    pad: Tensor  # B x hw
    base: Tensor  # B x hw
    h: int
    w: int


def _share_self(index: Tensor, is_self: Tensor) -> Tensor:
    """Self pairs use one set of points on both sides (``index`` ``P x 2 x J``)."""
    return torch.stack([index[:, 0], torch.where(is_self[:, None], index[:, 0], index[:, 1])], dim=1)
