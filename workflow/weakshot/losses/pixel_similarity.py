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
* DistLoss pairs stay inside that region (``similarity.distill_region_only``, default true). SimFormer's
  sampler tops J points up with pixels from *outside* the region when the region has fewer than J pixels,
  and its DistLoss then distils on those base pixels too, where the novel-class scores it aligns carry no
  class. At 640 crops (a 160 x 160 embedding) that is rare; on the embedded 16 x 16 embedding the non-base
  region of an image has a median of 45-95 pixels, so at J = 100 a third of SimFormer's points (46 % on
  Split 3) would be base pixels. Pairs with a point outside the region are left out, and each image pair's
  loss is the mean over its remaining pairs: the same loss as SimFormer's whenever the region holds J
  pixels. ``false`` restores SimFormer (every sampled pair counts, the mean over all J x J).
* Teacher batch norm: ``teacher_bn="batch"`` (default, SimFormer) normalises the teacher's pairs with their
  own batch statistics, as SimFormer's teacher ran in train mode; unlike SimFormer it does not update the
  running statistics with them (they are not used in training either way; keeping them base-pair only keeps
  ``teacher_bn="running"`` meaningful). ``"running"`` uses the running statistics of the SimLoss batches.
  In eval mode both use running statistics.

Cost: a training step evaluates SimNet on 2 * P * J * J pairs twice (SimLoss with gradient, the teacher
without), 320k pairs each at 16 pairs and J = 100; on P * J * J when every pair is a self pair.
:meth:`SimNet.pair_logits` does that without building the pair vectors, with block 0's first layer split over
the two point sets and the rest of the network streamed through the pair grids chunk by chunk (same function,
several times faster on CPU; see there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

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
    statistics with them?); ``"auto"`` follows ``nn.BatchNorm1d.forward``."""
    if stats == "auto":
        return bn.training or bn.running_mean is None, bn.training and bn.running_mean is not None
    if stats == "batch":
        return True, False
    if stats == "running":
        return False, False
    raise ValueError(f"stats must be 'auto', 'batch' or 'running', not {stats!r}")


def _running_statistics(bn: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise RuntimeError("this batch norm keeps no running statistics")
    return bn.running_mean, bn.running_var


@torch.no_grad()
def _update_running(bn: nn.BatchNorm1d, mean: Tensor, var: Tensor, count: int) -> None:
    """``nn.BatchNorm1d``'s training-time update of the running statistics from a batch of ``count`` rows
    with mean ``mean`` and biased variance ``var`` (momentum, or the cumulative average without one)."""
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.to(bn.running_mean), factor)
    bn.running_var.lerp_((var * (count / max(count - 1, 1))).to(bn.running_var), factor)


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

    Two ways to evaluate the same function: :meth:`logits` / :meth:`forward` take explicit pair vectors
    (the plain reference), :meth:`pair_logits` / :meth:`pair_probs` take two point sets and evaluate all
    their ordered pairs without building them (what the losses use, much faster at training scale).
    """

    def __init__(self, in_dim: int, width: int = 256, blocks: int = 3) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError("SimNet needs at least one residual block")
        dims = [2 * in_dim] + [width] * blocks
        self.blocks = nn.ModuleList(SimBlock(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, 2)
        self._workspace = _Workspace()  # pair_logits' large buffers, reused from call to call on CPU

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
        ``[..., K, D]`` -> ``[..., J, K, 2]``.

        Same values up to float rounding, same gradients (the Linear biases in front of batch-statistics
        norms get exactly 0, their true gradient, where the reference gets rounding noise), same updates of
        the running statistics. Why the shortcuts are exact:

        * Block 0's first Linear layers (``fc1`` and ``project``) on ``[f_j; g_k]``: with the weight split as
          ``[W_a, W_b]``, ``W [f_j; g_k] + c = (W_a f_j + c) + W_b g_k``. Two J x W and K x W products
          replace a (J*K) x 2D one, and the (J*K) x 2D concatenation is never built.
        * Its batch norm: a grid's pre-activations are ``a_j + b_k``. With ``m_a, v_a`` the mean and
          (biased) variance of ``a`` over j and ``m_b, v_b`` those of ``b`` over k, the grid's mean is
          ``m_a + m_b`` and its variance ``v_a + v_b`` (the centred cross term sums to zero over a full
          grid). Every grid holds J*K pairs, so the batch mean is the mean of the grid means and the batch
          variance the mean of ``v_a + v_b + (m_a + m_b - mean)^2``. Normalising is then a per-channel
          affine map, which keeps the sum separable: ``s (a_j + b_k) + t = (s a_j + t) + s b_k``. Only
          the ReLU needs the grid.
        * From that ReLU on, :class:`_PairTail` runs the rest of the network on the grids with a hand-written
          forward and backward pass (see there for what it does differently and why that is exact).
        """
        lead = torch.broadcast_shapes(first.shape[:-2], second.shape[:-2])
        j, k, d = first.shape[-2], second.shape[-2], first.shape[-1]
        first = first.expand(*lead, j, d).reshape(-1, j, d)  # L x J x D
        second = second.expand(*lead, k, d).reshape(-1, k, d)  # L x K x D

        block = self.blocks[0]
        w_a, w_b = block.fc1.weight.split(d, dim=1)
        a, b = F.linear(first, w_a, block.fc1.bias), F.linear(second, w_b)  # L x J x W, L x K x W
        batch, update = _bn_mode(block.bn1, stats)
        if batch:
            mean_a, mean_b = a.mean(1, keepdim=True), b.mean(1, keepdim=True)  # L x 1 x W
            var_a, var_b = (a - mean_a).square().mean(1), (b - mean_b).square().mean(1)  # L x W
            grid_mean = (mean_a + mean_b).squeeze(1)
            mean = grid_mean.mean(0)
            var = (var_a + var_b + (grid_mean - mean).square()).mean(0)
            if update:
                _update_running(block.bn1, mean.detach(), var.detach(), first.shape[0] * j * k)
        else:
            mean, var = _running_statistics(block.bn1)
        scale = block.bn1.weight * torch.rsqrt(var + block.bn1.eps)
        a, b = a * scale + (block.bn1.bias - mean * scale), b * scale

        if block.project is not None:  # residual relu(project([f; g])), split the same way
            p_a, p_b = block.project.weight.split(d, dim=1)
            res_a, res_b, res_relu = F.linear(first, p_a, block.project.bias), F.linear(second, p_b), True
        else:  # identity residual: [f; g] = [f; 0] + [0; g]
            res_a, res_b, res_relu = F.pad(first, (0, d)), F.pad(second, (d, 0)), False

        layers = [(block.fc2, block.bn2)]
        layers += [(fc, bn) for blk in self.blocks[1:] for fc, bn in ((blk.fc1, blk.bn1), (blk.fc2, blk.bn2))]
        params = [p for fc, bn in layers for p in (fc.weight, fc.bias, bn.weight, bn.bias)]
        inputs = [a, b, res_a, res_b, *params, self.head.weight, self.head.bias]
        spec = _TailSpec(
            norms=[bn for _, bn in layers],
            modes=[_bn_mode(bn, stats) for _, bn in layers],
            residual_relu=res_relu,
            keep=torch.is_grad_enabled() and any(t.requires_grad for t in inputs),
            workspace=self._workspace if a.device.type == "cpu" else None,
        )
        return _PairTail.apply(spec, *inputs).view(*lead, j, k, 2)

    def pair_probs(self, first: Tensor, second: Tensor, stats: str = "auto") -> Tensor:
        """P(similar) of all pairs ``[first_j; second_k]``: ``[..., J, D]`` x ``[..., K, D]`` -> ``[..., J, K]``,
        as ``softmax(l)[1] = sigmoid(l_1 - l_0)`` (one pass, not a softmax along a size-2 axis)."""
        logits = self.pair_logits(first, second, stats).float()
        return torch.sigmoid(logits[..., 1] - logits[..., 0])


# --- SimNet on pair grids: the streamed tail ---------------------------------------------------------------

# Rows (pairs) per chunk on CPU: large enough that per-chunk overhead (Python, kernel launch) stays small,
# small enough that a chunk's scratch tiles (rows x width floats each) stay in cache between its operations.
_CHUNK_ROWS = 6144


class _Workspace:
    """Large buffers handed back by one :class:`_PairTail` evaluation for the next one to reuse.

    Fresh memory costs a page fault per 4 KB page when first written, for an N x W buffer about as long as
    one of the tail's matrix products, and PyTorch has no caching allocator on CPU (a tensor that large goes
    back to the OS when freed). Training calls the tail with the same shapes at every step, so the buffers
    of the last calls are kept: 8 N x W buffers for SimLoss (3 blocks) and 2 for the teacher, about 800 MB
    at 16 pairs, J = 100, width 64 (the pair-grid implementation peaked at about twice that). A buffer
    comes back only when nothing reads it any more: at the end of a forward pass without gradient, at the
    end of the backward pass otherwise (a graph dropped without backward simply frees its buffers). Only
    buffers like the latest ones (shape, dtype, device, inference mode) are kept; copies and pickles of the
    module start empty.
    """

    def __init__(self) -> None:
        self.free: list[Tensor] = []

    @staticmethod
    def _kind(buffer: Tensor) -> tuple:
        return buffer.shape, buffer.dtype, buffer.device, buffer.is_inference()

    def take(self, rows: int, width: int, like: Tensor) -> Tensor:
        kind = (torch.Size([rows, width]), like.dtype, like.device, torch.is_inference_mode_enabled())
        for i, buffer in enumerate(self.free):
            if self._kind(buffer) == kind:
                return self.free.pop(i)
        return like.new_empty(rows, width)

    def give(self, buffers: Sequence[Tensor]) -> None:
        unique = list({id(b): b for b in buffers}.values())
        self.free = [b for b in self.free if self._kind(b) == self._kind(unique[0])] + unique

    def __deepcopy__(self, memo: dict) -> _Workspace:
        return _Workspace()

    def __getstate__(self) -> dict:
        return {"free": []}


class _TailSpec(NamedTuple):
    """Non-tensor arguments of :class:`_PairTail`."""

    norms: list[nn.BatchNorm1d]  # the tail's batch norms in layer order (eps, running statistics)
    modes: list[tuple[bool, bool]]  # per layer: (batch statistics?, update the running statistics?)
    residual_relu: bool  # block 0's residual is relu(project(x)), else the identity
    keep: bool  # keep what the backward pass needs (the call records a graph)
    workspace: _Workspace | None  # where the N x W buffers come from and go back to (None: allocate)


class _PairTail(torch.autograd.Function):
    """SimNet from block 0's first ReLU to the head's logits, on L grids of J x K pairs (N = L*J*K rows).

    Inputs: ``a`` (L x J x W) and ``b`` (L x K x W), block 0's normalised first layer split as in
    :meth:`SimNet.pair_logits` (hidden ``h0 = relu(a_j + b_k)``); ``res_a``, ``res_b``, its residual split
    the same way (``r = relu(res_a_j + res_b_k)``, no ReLU for an identity residual); per tail layer (block
    0's fc2/bn2, then fc1/bn1 and fc2/bn2 of each further block) ``weight, bias, gamma, beta``; the head's
    ``weight, bias``. Output: N x 2 logits, grid-major (row ``(l * J + j) * K + k``).

    Layer ``n`` computes ``z_n = W_n x_n + c_n`` and ``y_n = relu(bn_n(z_n))``. Layer 0 reads ``h0``, an
    odd layer (a block's fc1) the residual stream, an even layer >= 2 (its fc2) ``y_{n-1}``. The stream
    starts as ``r``, each even layer adds its ``y`` to it, and the head reads its final value.

    The arithmetic is that of ``SimNet.logits`` on the pair rows, in a different schedule. At training
    scale (N = 320k, W = 64) each N x W tensor is 80 MB; after the matrix products, what costs is fresh
    memory and passes over such tensors. So:

    * Rows go chunk by chunk (whole grids, or slices of one), each chunk's elementwise work on a few
      scratch tiles that stay in cache. Batch norm needs statistics over all rows before it normalises, so
      each layer is one pass that stores ``z_n`` and collects per-chunk means and variances (merged exactly
      at the end); the next pass normalises ``z_n`` on the fly.
    * N x W buffers: every ``z_n`` and the stream after each block when a graph is recorded; without one
      (the distillation teacher) a single ``z`` buffer (a pass overwrites the rows it has just read) and a
      single stream buffer. ``h0``, ``r`` and the ``y_n`` are rebuilt from the small inputs and the stored
      ``z_n`` with the forward pass's own operations (so with its float values). The backward pass keeps
      the stream's gradient in the final stream's buffer, and the gradient of ``y_{n-1}``'s pre-activation
      in ``z_n``'s buffer once it has read it: it allocates no N x W tensor. On CPU the buffers come from
      and go back to the SimNet's :class:`_Workspace`.
    * The backward of BatchNorm + ReLU is written out. With ``s = gamma / sigma``, ``xh = (z - mean) /
      sigma`` and ``du = dy * [y > 0]``: ``dz = s * (du - mean(du) - xh * mean(du * xh))`` with batch
      statistics (the last two terms are the gradient through the statistics; with running statistics
      ``dz = s * du``), ``dgamma = sum(du * xh)``, ``dbeta = sum(du)``. Those sums run over all rows, so
      they are collected in the pass of the layer above, and ``dz`` is formed in the layer's own pass.
    * Layer ``n`` stores ``z_n - c_n``, without the Linear bias: the norm subtracts a mean, so the bias
      only enters per-channel constants (``center``: the mean of the stored values, or the running mean
      minus the bias) and the product is a plain ``mm``. With batch statistics the output does not depend
      on ``c_n`` at all, and its gradient is exactly 0; with running ones it is ``sum(dz) = s * dbeta``.

    Elementwise steps use PyTorch's own fused kernels where they exist: BatchNorm's statistics and
    backward-reduction kernels, and ReLU's backward (``threshold_backward``), which masks a gradient by a
    pre-activation in one pass without a mask tensor.
    """

    @staticmethod
    def forward(
        ctx: Any, spec: _TailSpec, a: Tensor, b: Tensor, res_a: Tensor, res_b: Tensor, *params: Tensor
    ) -> Tensor:
        tail = _Tail(spec, a, b, res_a, res_b, params)
        logits = tail.forward()
        if spec.keep:
            ctx.save_for_backward(a, b, res_a, res_b, *params)  # for autograd's in-place modification check
            ctx.tail = tail
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        ctx.saved_tensors  # noqa: B018 -- raises if an input was modified in place since the forward pass
        tail = getattr(ctx, "tail", None)
        if tail is None:
            raise RuntimeError("the pair SimNet's graph supports a single backward pass")
        ctx.tail = None  # the backward pass consumes its buffers
        return (None, *tail.backward(grad))


def _relu_grad(grad: Tensor, pre: Tensor, out: Tensor) -> Tensor:
    """``grad * [pre > 0]`` written to ``out`` (which may be ``pre``): ReLU's own backward kernel."""
    return torch.ops.aten.threshold_backward.grad_input(grad, pre, 0.0, grad_input=out)


class _Chunk(NamedTuple):
    """Consecutive rows: of grids ``grids``, the points ``js`` of the first set (all J when the chunk
    holds several grids) against all K of the second."""

    index: int
    grids: slice
    js: slice
    size: int  # rows


class _Tail:
    """One evaluation of :class:`_PairTail`: geometry, buffers (used through per-chunk views made once per
    buffer) and each layer's normalisation constants."""

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
        self.grids, self.j, width = a.shape
        self.k = b.shape[1]
        self.rows = self.grids * self.j * self.k
        self.chunks = self._split(_CHUNK_ROWS if a.device.type == "cpu" else self.rows)
        self.sizes = [chunk.size for chunk in self.chunks]
        tiles = [a.new_empty(max(self.sizes), width) for _ in range(3)]  # scratch, viewed per chunk size
        self.tiles = [{size: tile[:size] for size in set(self.sizes)} for tile in tiles]
        # Per layer, from the forward pass: y = relu(z * scale + shift), xh = (z - center) * inv.
        self.center: list[Tensor] = []
        self.inv: list[Tensor] = []
        self.scale: list[Tensor] = []
        self.shift: list[Tensor] = []
        self.buffers: list[Tensor] = []  # the N x W buffers, for the workspace
        self.z: list[Sequence[Tensor]] = []  # per layer, z's per-chunk views
        self.streams: list[Sequence[Tensor]] = []  # per block, the views of the stream after it

    def _split(self, target: int) -> list[_Chunk]:
        """Chunks of about ``target`` rows: whole grids, or a grid cut along j when a grid is larger."""
        j, k, grid_rows = self.j, self.k, self.j * self.k
        if grid_rows > target:
            step = -(-j // -(-grid_rows // target))  # ceil(J / number of pieces)
            bounds = [(g, g + 1, j0, min(j0 + step, j)) for g in range(self.grids) for j0 in range(0, j, step)]
        else:
            per = target // grid_rows
            bounds = [(g, min(g + per, self.grids), 0, j) for g in range(0, self.grids, per)]
        return [
            _Chunk(i, slice(g0, g1), slice(j0, j1), (g1 - g0) * (j1 - j0) * k)
            for i, (g0, g1, j0, j1) in enumerate(bounds)
        ]

    def _views(self, buffer: Tensor) -> Sequence[Tensor]:
        return buffer.split(self.sizes)

    def _tile(self, index: int, chunk: _Chunk) -> Tensor:
        return self.tiles[index][chunk.size]

    def _grid_sum(self, left: Tensor, right: Tensor, chunk: _Chunk, out: Tensor, relu: bool) -> Tensor:
        """``left_j + right_k`` (optionally ReLU'd) on the chunk's rows, written to ``out`` (rows x W)."""
        lhs, rhs = left[chunk.grids, chunk.js].unsqueeze(2), right[chunk.grids].unsqueeze(1)
        torch.add(lhs, rhs, out=out.view(lhs.shape[0], lhs.shape[1], self.k, -1))
        return out.relu_() if relu else out

    def _grid_reduce(self, grad: Tensor, chunk: _Chunk, d_left: Tensor, d_right: Tensor) -> None:
        """Backward of :meth:`_grid_sum` before its ReLU: ``grad`` summed over k into ``d_left``, over j
        into ``d_right`` (which accumulates over the chunks of a grid)."""
        grid = grad.view(chunk.grids.stop - chunk.grids.start, chunk.js.stop - chunk.js.start, self.k, -1)
        torch.sum(grid, 2, out=d_left[chunk.grids, chunk.js])
        d_right[chunk.grids] += grid.sum(1)

    def _pre(self, n: int, chunk: _Chunk, out: Tensor) -> Tensor:
        """``bn_n(z_n)`` on the chunk's rows: ``y_n`` before its ReLU."""
        return torch.addcmul(self.shift[n], self.z[n][chunk.index], self.scale[n], out=out)

    # -- forward --

    def forward(self) -> Tensor:
        layers, blocks = self.num_layers, (self.num_layers + 1) // 2
        if self.spec.keep:
            z, streams = [self._buffer() for _ in range(layers)], [self._buffer() for _ in range(blocks)]
        else:
            z, streams = [self._buffer()] * layers, [self._buffer()] * blocks
        self.buffers = z + streams
        self.z, self.streams = [self._views(t) for t in z], [self._views(t) for t in streams]
        weight_t = [w.t() for w in self.weight]
        for n in range(layers + 1):  # n == layers: only the head's input, the final stream
            chunk_stats = []
            for chunk in self.chunks:
                i = chunk.index
                if n == 0:
                    x = self._grid_sum(self.a, self.b, chunk, self._tile(0, chunk), relu=True)  # h0
                else:
                    y = self._pre(n - 1, chunk, self._tile(0, chunk)).relu_()
                    if n == 1:  # the stream after block 0: r + y_0
                        x = self._grid_sum(self.res_a, self.res_b, chunk, self.streams[0][i], self.spec.residual_relu)
                        x = x.add_(y)
                    elif n % 2 == 1:  # a later block's input (or the head's): the stream plus y_{n-1}
                        x = torch.add(self.streams[n // 2 - 1][i], y, out=self.streams[n // 2][i])
                    else:
                        x = y
                if n == layers:
                    continue
                z_chunk = torch.mm(x, weight_t[n], out=self.z[n][i])
                if self.spec.modes[n][0]:  # the chunk's column means and biased variances, in one pass
                    chunk_stats.append(torch.ops.aten.batch_norm_update_stats(z_chunk, None, None, 0.0))
            if n < layers:
                self._set_norm(n, chunk_stats)
        # The head as one product over all rows (an N x 2 result is a slow shape for many small products).
        logits = torch.addmm(self.head_bias, self.buffers[-1], self.head_weight.t())
        if not self.spec.keep:
            self._release()
        return logits

    def _set_norm(self, n: int, chunk_stats: list[tuple[Tensor, Tensor]]) -> None:
        """Layer ``n``'s normalisation constants. Batch statistics are merged from the chunks' exactly: the
        total sum of squares is the chunks' sums of squares plus their sizes times (chunk mean - mean)^2."""
        bn, (batch, update) = self.spec.norms[n], self.spec.modes[n]
        if not batch:
            mean, var = _running_statistics(bn)
            center = mean - self.bias[n]
        elif len(chunk_stats) == 1:
            center, var = chunk_stats[0]
        else:
            means, variances = (torch.stack(s) for s in zip(*chunk_stats))  # chunks x W
            share = means.new_tensor(self.sizes).div_(self.rows).unsqueeze(1)
            center = (means * share).sum(0)
            var = ((variances + (means - center).square()) * share).sum(0)
        if batch and update:
            _update_running(bn, center + self.bias[n], var, self.rows)
        inv = torch.rsqrt(var + bn.eps)
        self.center.append(center)
        self.inv.append(inv)
        self.scale.append(self.gamma[n] * inv)
        self.shift.append(self.beta[n] - center * self.scale[n])

    def _buffer(self) -> Tensor:
        workspace, width = self.spec.workspace, self.a.shape[-1]
        return self.a.new_empty(self.rows, width) if workspace is None else workspace.take(self.rows, width, self.a)

    def _release(self) -> None:
        """Hand the N x W buffers back to the workspace: nothing reads them any more."""
        if self.spec.workspace is not None and self.buffers:
            self.spec.workspace.give(self.buffers)
        self.buffers, self.z, self.streams = [], [], []

    # -- backward --

    def backward(self, grad: Tensor) -> list[Tensor]:
        layers, top = self.num_layers, self.num_layers - 1
        d_weight = [torch.zeros_like(w) for w in self.weight]
        d_a, d_b = torch.empty_like(self.a), torch.zeros_like(self.b)
        d_res_a, d_res_b = torch.empty_like(self.res_a), torch.zeros_like(self.res_b)
        # Per layer, the per-chunk parts of dgamma = sum(du * xh) and dbeta = sum(du), then their totals.
        d_gamma: list[list[Tensor]] = [[] for _ in range(layers)]
        d_beta: list[list[Tensor]] = [[] for _ in range(layers)]

        def collect(n: int, chunk: _Chunk, du: Tensor) -> None:
            """Layer n's sums on the chunk, in one pass of BatchNorm's backward reduction."""
            _, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                du, self.z[n][chunk.index], self.gamma[n], None, None, self.center[n], self.inv[n], True, 0.0,
                [False, True, True],
            )  # fmt: skip
            d_gamma[n].append(dgamma)
            d_beta[n].append(dbeta)

        # Head, logits = W_h x + c_h on the final stream, whose buffer then takes the stream's gradient.
        grad, final = grad.contiguous(), self.buffers[-1]
        d_head_weight, d_head_bias = grad.t() @ final, grad.sum(0)
        d_stream = self._views(torch.mm(grad, self.head_weight, out=final))
        for chunk in self.chunks:  # the top layer's sums
            du = _relu_grad(d_stream[chunk.index], self._pre(top, chunk, self._tile(1, chunk)), self._tile(1, chunk))
            collect(top, chunk, du)

        # Layer n's pass: dz_n (its sums are complete), dW_n, the gradient of its input, layer n-1's sums.
        for n in range(top, -1, -1):
            scale = self.scale[n]
            d_gamma[n], d_beta[n] = [torch.stack(d_gamma[n]).sum(0)], [torch.stack(d_beta[n]).sum(0)]
            if self.spec.modes[n][0]:
                # dz = scale * du - scale * mean(du) - xh * scale * mean(du * xh), xh = (z - center) * inv,
                # as scale * du + slope * z + const: one multiply-add in z, one in du.
                slope = -scale * d_gamma[n][0] / self.rows * self.inv[n]
                const = -scale * d_beta[n][0] / self.rows - slope * self.center[n]
            else:  # running statistics are constants: dz = scale * du
                const = slope = torch.zeros_like(scale)
            for chunk in self.chunks:
                i = chunk.index
                if n == top:  # du = d_stream * [y_top > 0]
                    du = _relu_grad(d_stream[i], self._pre(n, chunk, self._tile(1, chunk)), self._tile(1, chunk))
                else:  # written by layer n+1's pass
                    du = self.z[n + 1][i]
                dz = torch.addcmul(const, self.z[n][i], slope, out=self._tile(0, chunk)).addcmul_(du, scale)
                if n == 0:
                    x = self._grid_sum(self.a, self.b, chunk, self._tile(2, chunk), relu=True)  # h0
                elif n % 2 == 1:
                    x = self.streams[n // 2][i]
                else:
                    x = self._pre(n - 1, chunk, self._tile(2, chunk)).relu_()  # y_{n-1}
                d_weight[n].addmm_(dz.t(), x)
                if n == 0:  # h0 = relu(a_j + b_k); the stream started as r = relu(res_a_j + res_b_k)
                    dh = torch.mm(dz, self.weight[n], out=self._tile(1, chunk))
                    self._grid_reduce(_relu_grad(dh, x, dh), chunk, d_a, d_b)
                    dr = d_stream[i]
                    if self.spec.residual_relu:
                        r = self._grid_sum(self.res_a, self.res_b, chunk, self._tile(0, chunk), relu=True)
                        dr = _relu_grad(dr, r, r)
                    self._grid_reduce(dr, chunk, d_res_a, d_res_b)
                elif n % 2 == 1:  # x is the stream: its gradient gains this branch's
                    dy = d_stream[i].addmm_(dz, self.weight[n])
                    pre = self._pre(n - 1, chunk, self._tile(1, chunk))
                    collect(n - 1, chunk, _relu_grad(dy, pre, self.z[n][i]))  # z_n's rows are read: reuse
                else:  # x = y_{n-1}
                    dy = torch.mm(dz, self.weight[n], out=self._tile(1, chunk))
                    collect(n - 1, chunk, _relu_grad(dy, x, self.z[n][i]))

        self._release()
        param_grads = []
        for n in range(layers):
            d_gamma_n, d_beta_n = d_gamma[n][0], d_beta[n][0]
            d_bias = torch.zeros_like(d_beta_n) if self.spec.modes[n][0] else self.scale[n] * d_beta_n
            param_grads += [d_weight[n], d_bias, d_gamma_n, d_beta_n]
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


def _identity(value: Tensor) -> Tensor:
    return value


# --- loss pieces -----------------------------------------------------------------------------------------


def pair_grid(first: Tensor, second: Tensor) -> Tensor:
    """All ordered pairs ``[first_j; second_k]``: ``[..., J, D]`` x ``[..., K, D]`` -> ``[..., J, K, 2D]``.

    The explicit input of :meth:`SimNet.logits`; the losses use :meth:`SimNet.pair_logits`, which never
    builds it (this tensor alone is 160 MB at training scale).
    """
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
    image in the non-base region (padding excluded unless ``distill_padding``; with
    ``cfg.distill_region_only`` the pairs of points the sampler had to take outside it are left out); teacher
    t = SimNet([f_i; f_j]) without gradient; student s = ReLU(cos(S(i), S(j))) with
    S[c] = sum_q softmax(cls_q)[c] * sigmoid(mask_q) over the split's novel classes c, sampled at the
    points; mean of :func:`distill_loss_map` over the pair's J x J (x 2) pairs (those inside the region),
    0 for other pairs.
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
        # Sums a tensor over the ranks of a multi-GPU job (World.sum), so that every rank keeps the same pair
        # counts: the class-balanced weights of the global batch. Identity in one process.
        self.sum_over_ranks: Callable[[Tensor], Tensor] = _identity
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
        all_self = _all_self_pairs(pairs, self.cfg.pairing)
        pairs = pairs.to(device)
        novel_ids = batch["novel_ids"].to(device)

        labels = nearest_downsample(batch["labels"].to(device), (h, w)).reshape(b, h * w)
        pad = nearest_downsample(batch["pad_mask"].to(device), (h, w)).reshape(b, h * w)
        base = (labels != IGNORE_LABEL) & ~torch.isin(labels, novel_ids)
        base_hot, novel_hot = class_hot(batch["targets"], pred_logits.shape[-1] - 1, device)

        is_self = pairs[:, 0] == pairs[:, 1]
        # Direction d of pair p pairs side d's points with side 1-d's; for a self pair the second direction
        # repeats the first (the same ordered pairs in the same order) and is masked out, or, when every pair
        # of the batch is a self pair (Self-Pair), not computed at all: half of SimNet's work, same losses.
        directions = torch.stack([torch.ones_like(is_self), ~is_self], dim=1)  # P x 2
        view = _PairView(pairs, is_self, directions, 1 if all_self else 2, labels, pad, base, h, w)

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

        d = view.sides
        other = [1, 0][:d]  # direction d pairs side d with side 1 - d
        logits = self.simnet.pair_logits(feats[:, :d], feats[:, other]).float()  # P x d x J x J x 2
        target = point_labels[:, :d].unsqueeze(-1) == point_labels[:, other].unsqueeze(-2)  # P x d x J x J
        valid = point_base[:, :d].unsqueeze(-1) | point_base[:, other].unsqueeze(-2)  # OR: >= 1 base pixel
        valid = valid & view.directions[:, :d, None, None]

        if self.training:
            counts = torch.stack([(target & valid).sum(), (~target & valid).sum()]).float()
            self.balance.update(*self.sum_over_ranks(counts).unbind())
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
        d = view.sides
        other = [1, 0][:d]

        with torch.no_grad():
            feats = gather_points(mask_features.detach(), pairs, index)
            stats = "batch" if (self.training and self.teacher_bn == "batch") else "running"
            teacher = self.simnet.pair_probs(feats[:, :d], feats[:, other], stats=stats)  # P x d x J x J

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
        student = F.relu(unit[:, :d] @ unit[:, other].transpose(-1, -2))  # P x d x J x J

        loss = distill_loss_map(teacher, student, self.cfg.distill_loss)
        active = (shares[:, None] & view.directions[:, :d])[:, :, None, None].expand_as(loss)
        if self.cfg.distill_region_only:
            inside = region[pairs.unsqueeze(-1), index]  # P x 2 x J: the sampler found the point in the region
            active = active & inside[:, :d].unsqueeze(-1) & inside[:, other].unsqueeze(-2)
            counted = active.flatten(1).sum(1).clamp(min=1)
            self.metrics["distill_points_inside"] = inside.float().mean().detach()
        else:
            counted = view.directions.sum(1) * num_points * num_points
        per_pair = torch.where(active, loss, 0.0).flatten(1).sum(1) / counted
        self.metrics["distill_pair_share"] = shares.float().mean().detach()
        return per_pair.mean()


class _PairView(NamedTuple):
    """What both losses need of the batch, at the mask-feature size (``hw = h * w``)."""

    pairs: Tensor  # P x 2 batch indices
    is_self: Tensor  # P, pair (b, b)
    directions: Tensor  # P x 2, which of the two pairing directions count
    sides: int  # directions computed: 1 when every pair is a self pair (its second direction repeats it), else 2
    labels: Tensor  # B x hw
    pad: Tensor  # B x hw
    base: Tensor  # B x hw
    h: int
    w: int


def _all_self_pairs(pairs: Tensor, pairing: str) -> bool:
    """Whether every pair of the batch is (b, b), read without a device synchronisation: from the pairs when
    they are on the CPU (where collate builds them), else from ``pairing`` (Self-Pair batches hold only self
    pairs; a cross batch may hold a few, which then stay masked)."""
    if pairs.device.type != "cpu":
        return pairing == "self"
    all_self = bool((pairs[:, 0] == pairs[:, 1]).all())
    if pairing == "self" and not all_self:
        raise ValueError("similarity.pairing 'self' got a batch with cross-image pairs")
    return all_self


def _share_self(index: Tensor, is_self: Tensor) -> Tensor:
    """Self pairs use one set of points on both sides (``index`` ``P x 2 x J``)."""
    return torch.stack([index[:, 0], torch.where(is_self[:, None], index[:, 0], index[:, 1])], dim=1)
