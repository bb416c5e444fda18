"""Tests of the plain-PyTorch MaskFormer: shapes, torchvision compatibility, frozen BN, inference, optimizer groups.

The torchvision layout is rebuilt here from its naming rule (stem ``conv1``/``bn1``; ``layer{i}.{j}`` blocks
with ``conv*``/``bn*``; a ``downsample.0/1`` projection on the first block of a stage whose shape changes),
not by importing torchvision, and the parameter count is torchvision's published ResNet-50 total minus ``fc``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weakshot.config import BackboneConfig, ModelConfig, RunConfig
from weakshot.model import (
    FrozenBatchNorm2d,
    MaskFormer,
    PixelDecoder,
    PositionEmbeddingSine,
    ResNet,
    load_torchvision_weights,
    param_groups,
    postprocess,
    segment,
    semantic_inference,
)
from weakshot.model.transformer import DecoderLayer

R50_PARAMS_WITHOUT_FC = 25_557_032 - (2048 * 1000 + 1000)  # torchvision resnet50 total minus fc = 23,508,032
EMBEDDED = ModelConfig(
    backbone=BackboneConfig(depth=18, widths=(32, 64, 128, 256), blocks=(1, 1, 1, 1), stem="small", norm="bn"),
    conv_dim=64,
    mask_dim=64,
    hidden_dim=64,
    num_queries=24,
    num_heads=4,
    dec_layers=3,
    dim_feedforward=256,
)
# A narrow ResNet-50 layout (Bottleneck, downsample on every first block) that builds and runs in milliseconds.
TINY_R50 = BackboneConfig(depth=50, widths=(8, 16, 32, 64), blocks=(1, 2, 1, 1), norm="bn")


def torchvision_keys(blocks: tuple[int, ...], bottleneck: bool, batches_tracked: bool = True) -> list[str]:
    """State-dict keys of a torchvision ResNet without ``fc``, from the layout rule."""

    def norm(prefix: str) -> list[str]:
        stats = ["weight", "bias", "running_mean", "running_var"] + (["num_batches_tracked"] if batches_tracked else [])
        return [f"{prefix}.{s}" for s in stats]

    keys = ["conv1.weight", *norm("bn1")]
    convs = 3 if bottleneck else 2
    for i, count in enumerate(blocks):
        for j in range(count):
            prefix = f"layer{i + 1}.{j}"
            for c in range(1, convs + 1):
                keys += [f"{prefix}.conv{c}.weight", *norm(f"{prefix}.bn{c}")]
            # Bottleneck stage 1 changes channels (64 -> 256); BasicBlock stage 1 keeps shape and stride.
            if j == 0 and (bottleneck or i > 0):
                keys += [f"{prefix}.downsample.0.weight", *norm(f"{prefix}.downsample.1")]
    return keys


def _outputs_shapes(out: dict) -> dict:
    return {k: tuple(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny: with several threads, OpenMP spin-waiting costs more than it saves and makes
    the file many times slower on a shared 2-core machine. Restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def paper_model() -> MaskFormer:
    torch.manual_seed(0)
    return MaskFormer(ModelConfig(), num_classes=171)


# --- shapes -------------------------------------------------------------------------------------------------


def test_paper_scale_output_shapes(paper_model: MaskFormer) -> None:
    with torch.no_grad():
        out = paper_model(torch.rand(1, 3, 64, 64) * 255)
    assert paper_model.mask_stride == 4
    assert _outputs_shapes(out) == {
        "pred_logits": (1, 100, 172),
        "pred_masks": (1, 100, 16, 16),
        "mask_features": (1, 256, 16, 16),
    }
    assert len(out["aux_outputs"]) == 5  # 6 decoder layers, the last is the main output
    for aux in out["aux_outputs"]:
        assert _outputs_shapes(aux) == {"pred_logits": (1, 100, 172), "pred_masks": (1, 100, 16, 16)}
    assert paper_model.backbone.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    assert paper_model.backbone.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def test_embedded_scale_output_shapes() -> None:
    torch.manual_seed(0)
    model = MaskFormer(EMBEDDED, num_classes=20)
    out = model(torch.rand(2, 3, 64, 96) * 255)
    assert model.mask_stride == 2
    assert _outputs_shapes(out) == {
        "pred_logits": (2, 24, 21),
        "pred_masks": (2, 24, 32, 48),
        "mask_features": (2, 64, 32, 48),
    }
    assert [_outputs_shapes(a)["pred_masks"] for a in out["aux_outputs"]] == [(2, 24, 32, 48)] * 2
    assert model.backbone.out_strides == {"res2": 2, "res3": 4, "res4": 8, "res5": 16}
    feats = model.backbone(torch.zeros(1, 3, 64, 64))
    for name, f in feats.items():
        assert f.shape[1] == model.backbone.out_channels[name]
        assert f.shape[-1] == 64 // model.backbone.out_strides[name]

    no_aux = MaskFormer(replace(EMBEDDED, deep_supervision=False), num_classes=20)
    assert no_aux(torch.zeros(1, 3, 32, 32))["aux_outputs"] == []


def test_pixel_embedding_is_the_decoder_memory() -> None:
    """With transformer_in_feature pixel_embedding the queries read mask_features, not res5: the class
    logits then change when only the pixel decoder changes, and the res5 stage gets gradient only through
    the FPN."""
    torch.manual_seed(0)
    model = MaskFormer(replace(EMBEDDED, transformer_in_feature="pixel_embedding"), num_classes=20)
    assert model.predictor.input_proj.in_channels == EMBEDDED.mask_dim
    images = torch.rand(2, 3, 64, 64) * 255
    out = model(images)
    assert _outputs_shapes(out)["pred_logits"] == (2, 24, 21)
    with torch.no_grad():
        model.pixel_decoder.mask_features.bias.add_(1.0)
    assert not torch.allclose(model(images)["pred_logits"], out["pred_logits"])

    res5_model = MaskFormer(EMBEDDED, num_classes=20)
    assert res5_model.predictor.input_proj.in_channels == res5_model.backbone.out_channels["res5"]
    with pytest.raises(ValueError, match="model.transformer_in_feature"):
        RunConfig.from_dict({"model": {"transformer_in_feature": "res4"}})


# --- torchvision layout and weights -------------------------------------------------------------------------


def test_resnet50_matches_torchvision_layout_and_size() -> None:
    bn = ResNet(BackboneConfig(norm="bn"))
    assert sum(p.numel() for p in bn.parameters()) == R50_PARAMS_WITHOUT_FC
    assert list(bn.state_dict()) == torchvision_keys((3, 4, 6, 3), bottleneck=True)
    # Stride in the 3x3 conv (torchvision, detectron2 STRIDE_IN_1X1 False).
    assert bn.layer2[0].conv1.stride == (1, 1) and bn.layer2[0].conv2.stride == (2, 2)
    assert tuple(bn.layer1[0].conv3.weight.shape) == (256, 64, 1, 1)
    assert tuple(bn.layer1[0].downsample[0].weight.shape) == (256, 64, 1, 1)

    frozen = ResNet(BackboneConfig())  # the paper's frozen BN: affine terms become buffers
    assert set(frozen.state_dict()) == set(torchvision_keys((3, 4, 6, 3), True, batches_tracked=False))
    affine = sum(m.weight.numel() + m.bias.numel() for m in frozen.modules() if isinstance(m, FrozenBatchNorm2d))
    assert sum(p.numel() for p in frozen.parameters()) + affine == R50_PARAMS_WITHOUT_FC


def test_resnet18_layout() -> None:
    r18 = ResNet(BackboneConfig(depth=18, norm="bn"))
    assert list(r18.state_dict()) == torchvision_keys((2, 2, 2, 2), bottleneck=False)
    assert r18.out_channels == {"res2": 64, "res3": 128, "res4": 256, "res5": 512}


def _randomise_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=gen) + 0.5
            m.bias.data = torch.randn(n, generator=gen)
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.num_batches_tracked.fill_(7)


def _save_torchvision_like(model: nn.Module, path: Path, drop: tuple[str, ...] = ()) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items() if k not in drop}
    state["fc.weight"] = torch.randn(1000, 64 * 4)
    state["fc.bias"] = torch.randn(1000)
    torch.save(state, path)


def test_load_torchvision_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = ResNet(TINY_R50)
    _randomise_bn(source)
    source.eval()
    path = tmp_path / "resnet.pth"
    _save_torchvision_like(source, path)

    # Into frozen BN: num_batches_tracked and fc.* dropped; eval-mode BN and frozen BN compute the same thing.
    frozen = ResNet(replace(TINY_R50, norm="frozen_bn"))
    load_torchvision_weights(frozen, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = source(x), frozen(x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)

    # Into trainable BN: every tensor comes back, counters included.
    again = ResNet(TINY_R50)
    load_torchvision_weights(again, path)
    for key, value in source.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key

    # Checkpoints from before num_batches_tracked existed load too.
    old = tmp_path / "old.pth"
    _save_torchvision_like(source, old, drop=tuple(k for k in source.state_dict() if k.endswith("num_batches_tracked")))
    load_torchvision_weights(ResNet(TINY_R50), old)


def test_load_torchvision_weights_reports_mismatches(tmp_path: Path) -> None:
    source = ResNet(TINY_R50)
    path = tmp_path / "broken.pth"
    _save_torchvision_like(source, path, drop=("layer1.0.conv2.weight",))
    with pytest.raises(ValueError, match=r"broken\.pth.*1 missing keys: layer1\.0\.conv2\.weight"):
        load_torchvision_weights(ResNet(TINY_R50), path)

    extra = tmp_path / "extra.pth"
    torch.save({**source.state_dict(), "layer5.0.conv1.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
        load_torchvision_weights(ResNet(TINY_R50), extra)

    # A stem mismatch (7x7 weights into the 3x3 small stem) is a shape error naming the tensor.
    good = tmp_path / "good.pth"
    _save_torchvision_like(source, good)
    small = ResNet(replace(TINY_R50, stem="small"))
    with pytest.raises(
        ValueError, match=r"shape mismatches: conv1\.weight \(file \(8, 3, 7, 7\), model \(8, 3, 3, 3\)\)"
    ):
        load_torchvision_weights(small, good)

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_torchvision_weights(small, tmp_path / "nowhere.pth")


# --- frozen BN and gradients --------------------------------------------------------------------------------


def test_frozen_bn_has_no_trainable_state() -> None:
    torch.manual_seed(0)
    backbone = ResNet(replace(TINY_R50, norm="frozen_bn"))
    frozen = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(list(m.parameters()) == [] for m in frozen)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()
    feats = backbone(torch.randn(2, 3, 64, 64))
    feats["res5"].square().mean().backward()
    for m in frozen:
        for buf in m.buffers():
            assert not buf.requires_grad and buf.grad is None
    for key, value in backbone.state_dict().items():  # train-mode forward did not touch running stats
        assert torch.equal(value, before[key]), key
    assert backbone.conv1.weight.grad is not None and backbone.conv1.weight.grad.abs().sum() > 0

    # Under autocast-style low precision input the output keeps the input dtype.
    fbn = FrozenBatchNorm2d(4)
    assert fbn(torch.randn(1, 4, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_gradients_reach_backbone_from_mask_loss() -> None:
    torch.manual_seed(0)
    model = MaskFormer(EMBEDDED, num_classes=20)
    out = model(torch.rand(2, 3, 64, 64) * 255)
    F.binary_cross_entropy_with_logits(out["pred_masks"], torch.rand_like(out["pred_masks"])).backward()
    for name, p in model.backbone.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.predictor.class_embed.weight.grad is None  # masks do not depend on the class head


# --- inference ----------------------------------------------------------------------------------------------


def test_semantic_inference_matches_loop() -> None:
    torch.manual_seed(0)
    b, q, k, h, w = 2, 5, 3, 4, 6
    logits, masks = torch.randn(b, q, k + 1), torch.randn(b, q, h, w)
    want = torch.zeros(b, k, h, w)
    for i in range(b):
        for j in range(q):
            probs = torch.softmax(logits[i, j], dim=0)  # softmax over K+1, then drop no-object
            for c in range(k):
                want[i, c] += probs[c] * torch.sigmoid(masks[i, j])
    torch.testing.assert_close(semantic_inference(logits, masks), want)


def test_postprocess_crops_padding_before_resizing() -> None:
    # Image of 16x24 padded to 32x32; padding scores are huge, so resizing without cropping would leak them.
    padded, image, output = (32, 32), (16, 24), (40, 60)
    scores = torch.zeros(1, 2, 8, 8)
    scores[..., 4:, :] = 100.0  # rows 16.. of the padded input
    scores[..., :, 6:] = 100.0  # columns 24..
    scores[:, 1, :4, :6] = torch.arange(24.0).view(4, 6)
    got = postprocess(scores, padded, image, output)
    up = F.interpolate(scores, size=padded, mode="bilinear", align_corners=False)
    want = F.interpolate(up[..., :16, :24], size=output, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want)
    assert got.shape == (1, 2, 40, 60)
    uncropped = F.interpolate(up, size=output, mode="bilinear", align_corners=False)
    # Resizing the padded map would squeeze the padding into the image: its bottom rows would be all padding.
    # (Bilinear upsampling itself still blends the first padded cell into the image border, as in MaskFormer.)
    assert uncropped[:, 0, 30:].min() > 99.99
    assert got[:, 0, 30:].max() < 65.0 and got[:, 0, :30, :40].max() == 0.0

    # segment(): per-image sizes, upsampling the mask logits before the sigmoid.
    logits, masks = torch.randn(2, 3, 5), torch.randn(2, 3, 8, 8)
    out = list(
        segment({"pred_logits": logits, "pred_masks": masks}, padded, [(16, 24), (32, 20)], [(40, 60), (32, 20)])
    )
    assert [tuple(s.shape) for s in out] == [(4, 40, 60), (4, 32, 20)]
    ref = semantic_inference(logits[1:], F.interpolate(masks[1:], size=padded, mode="bilinear", align_corners=False))
    torch.testing.assert_close(out[1], ref[0, :, :32, :20])


def test_position_encoding_formula() -> None:
    feats, h, w = 8, 3, 5
    pos = PositionEmbeddingSine(feats)(torch.zeros(2, 7, h, w))
    assert pos.shape == (2, 2 * feats, h, w)
    y, x, k = 1, 3, 1  # channel pair 2k, 2k+1
    freq = 10000 ** (2 * k / feats)
    y_angle, x_angle = (y + 1) / h * 2 * math.pi / freq, (x + 1) / w * 2 * math.pi / freq
    expected = [math.sin(y_angle), math.cos(y_angle), math.sin(x_angle), math.cos(x_angle)]
    got = [pos[1, 2 * k, y, x], pos[1, 2 * k + 1, y, x], pos[1, feats + 2 * k, y, x], pos[1, feats + 2 * k + 1, y, x]]
    for g, e in zip(got, expected):
        assert abs(float(g) - e) < 1e-5


def test_decoder_layer_is_post_norm_detr_layer() -> None:
    """With zero positional terms a DETR decoder layer is torch's post-norm ReLU decoder layer; with them, the
    query embedding must reach queries/keys but not values, and ``pos`` only the memory keys."""
    torch.manual_seed(0)
    layer = DecoderLayer(16, 4, 32, dropout=0.0).eval()
    ref = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=False).eval()
    ref.self_attn.load_state_dict(layer.self_attn.state_dict())
    ref.multihead_attn.load_state_dict(layer.cross_attn.state_dict())
    for name in ("linear1", "linear2", "norm1", "norm2", "norm3"):
        getattr(ref, name).load_state_dict(getattr(layer, name).state_dict())
    tgt, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(tgt, memory, torch.zeros_like(memory), torch.zeros_like(tgt)), ref(tgt, memory)
        )
        # ``pos`` goes to the memory keys only: the same vector at every memory position shifts all attention
        # logits of a query equally, so softmax and output are unchanged (it would not be so if pos reached
        # the values); a position-dependent pos does change the output.
        zero_q, zero_m = torch.zeros_like(tgt), torch.zeros_like(memory)
        base = layer(tgt, memory, zero_m, zero_q)
        torch.testing.assert_close(layer(tgt, memory, torch.randn(16).expand_as(memory), zero_q), base)
        assert not torch.allclose(layer(tgt, memory, torch.randn_like(memory), zero_q), base, atol=1e-3)
        assert not torch.allclose(layer(tgt, memory, zero_m, torch.randn_like(tgt)), base, atol=1e-3)


def test_pixel_decoder_group_norm_divides_channels() -> None:
    decoder = PixelDecoder({"res2": 16, "res3": 32}, conv_dim=48, mask_dim=8, norm_groups=32)
    groups = {m.num_groups for m in decoder.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {16}  # gcd(32, 48)
    out = decoder({"res2": torch.randn(1, 16, 8, 8), "res3": torch.randn(1, 32, 4, 4)})
    assert out.shape == (1, 8, 8, 8)


# --- optimizer groups ---------------------------------------------------------------------------------------


def test_param_groups_cover_every_parameter_once() -> None:
    model = MaskFormer(EMBEDDED, num_classes=20)
    groups = param_groups(model, lr=1e-4, weight_decay=1e-4, backbone_multiplier=0.1)
    owner = {id(p): name for name, p in model.named_parameters()}
    placed: dict[str, dict] = {}
    for group in groups:
        for p in group["params"]:
            name = owner[id(p)]
            assert name not in placed, f"{name} in two groups"
            placed[name] = group
    assert set(placed) == set(owner.values())

    modules = dict(model.named_modules())
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
    for name, group in placed.items():
        module = modules[name.rsplit(".", 1)[0]]
        in_backbone = name.startswith("backbone.")
        assert group["lr"] == pytest.approx(1e-5 if in_backbone else 1e-4), name
        assert group["weight_decay"] == (0.0 if isinstance(module, norm_types) else 1e-4), name
    # Spot checks of the rules' consequences.
    assert placed["predictor.query_embed.weight"]["weight_decay"] == 0.0
    assert placed["backbone.bn1.weight"]["name"] == "backbone_no_decay"
    assert placed["predictor.decoder.layers.0.norm1.weight"]["weight_decay"] == 0.0
    assert placed["predictor.class_embed.bias"]["weight_decay"] == 1e-4  # MaskFormer decays non-norm biases
    assert placed["predictor.decoder.layers.0.self_attn.in_proj_weight"]["name"] == "head"
    torch.optim.AdamW(groups)  # accepted as they are

    frozen = MaskFormer(replace(EMBEDDED, backbone=replace(EMBEDDED.backbone, norm="frozen_bn")), 20)
    names = [g["name"] for g in param_groups(frozen, 1e-4, 1e-4, 0.1)]
    assert names == ["head", "head_no_decay", "backbone"]


def test_masked_attention_ignores_memory_outside_the_mask():
    torch.manual_seed(0)
    layer = DecoderLayer(16, 2, 32, 0.0).eval()
    tgt, query_pos = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    memory, pos = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    blocked = torch.zeros(1, 3, 5, dtype=torch.bool)
    blocked[:, :, 3:] = True  # every query may read positions 0-2 only
    mask = blocked.repeat_interleave(2, dim=0)
    out = layer(tgt, memory, pos, query_pos, mask)
    changed = memory.clone()
    changed[:, 3:] += 5.0
    torch.testing.assert_close(layer(tgt, changed, pos, query_pos, mask), out)
    assert not torch.allclose(layer(tgt, changed, pos, query_pos), layer(tgt, memory, pos, query_pos))


def test_masked_attention_decoder_uses_previous_layer_masks():
    from weakshot.model.transformer import TransformerDecoder

    torch.manual_seed(0)
    decoder = TransformerDecoder(16, 2, 3, 32, 0.0).eval()
    memory, pos, query_pos = torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    seen = []

    def empty_masks(states):  # every query predicts an empty mask: it must attend everywhere, not to nothing
        seen.append(states)
        return torch.full((*states.shape[:2], 6), -1.0)

    out = decoder(memory, pos, query_pos, empty_masks)
    assert len(seen) == 2  # layers 2 and 3 are masked by the outputs of layers 1 and 2
    torch.testing.assert_close(seen[0], out[0])
    torch.testing.assert_close(out, decoder(memory, pos, query_pos))  # empty masks = unmasked
    assert torch.isfinite(out).all()


def test_learned_query_features_mask_the_first_layer_with_their_own_prediction():
    """Mask2Former's start: the decoder begins at the learned features, returns their normalised state as an
    extra first output, and the first layer already attends only inside the mask that state predicts."""
    from weakshot.model.transformer import TransformerDecoder

    torch.manual_seed(0)
    decoder = TransformerDecoder(16, 2, 1, 32, 0.0).eval()
    memory, pos, query_pos = torch.randn(1, 6, 16), torch.randn(1, 6, 16), torch.randn(1, 3, 16)
    initial = torch.randn(1, 3, 16)
    seen = []

    def query0_sees_half(states):  # query 0 predicts positions 0-2, the others everything
        seen.append(states)
        logits = torch.ones(*states.shape[:2], 6)
        logits[:, 0, 3:] = -1.0
        return logits

    out = decoder(memory, pos, query_pos, query0_sees_half, initial)
    assert out.shape == (2, 1, 3, 16)  # the initial state, then the one layer
    torch.testing.assert_close(out[0], decoder.norm(initial))
    torch.testing.assert_close(seen[0], out[0])  # the first layer is masked by the initial prediction
    changed = memory.clone()
    changed[:, 3:] += 5.0
    moved = decoder(changed, pos, query_pos, query0_sees_half, initial)
    torch.testing.assert_close(moved[1, :, 0], out[1, :, 0])  # query 0 never reads positions 3-5
    assert not torch.allclose(moved[1, :, 1], out[1, :, 1])
    assert not torch.allclose(decoder(memory, pos, query_pos), decoder(memory, pos, query_pos, None, initial)[1:])


def test_learned_query_features_add_one_supervised_output():
    """The prediction from the learned features is one more aux output, and the criterion's weight dict
    counts it: a model and its criterion built from the same config agree, and training reaches the features."""
    from weakshot.config import LossConfig
    from weakshot.losses import build_criterion

    torch.manual_seed(0)
    cfg = replace(EMBEDDED, query_features=True, masked_attention=True)
    model = MaskFormer(cfg, num_classes=5)
    out = model(torch.rand(2, 3, 32, 32) * 255)
    assert len(out["aux_outputs"]) == cfg.dec_layers  # dec_layers - 1 intermediate layers + the initial state
    criterion = build_criterion(5, cfg, LossConfig())
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :16] = True
    masks[1] = True
    targets = [
        {"labels": torch.tensor([1]), "masks": masks[:1], "has_mask": torch.tensor([True])},
        {"labels": torch.tensor([3]), "masks": masks[1:], "has_mask": torch.tensor([True])},
    ]
    losses = criterion(out, {"targets": targets})
    assert {f"loss_ce_{cfg.dec_layers - 1}", "loss_dice_0"} <= set(criterion.weight_dict)
    total = sum(losses[name] * weight for name, weight in criterion.weight_dict.items())
    total.backward()
    assert model.predictor.query_feat.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="aux outputs"):
        build_criterion(5, replace(cfg, query_features=False), LossConfig())(out, {"targets": targets})
