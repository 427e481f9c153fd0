"""Observation encoder: torchvision ResNet-18 topology with GroupNorm, preprocessing inside the encoder."""

import torch
import torchvision
from torch import nn

from smp_ros.config import preset
from smp_ros.model.encoder import ObservationEncoder, ResNet18Backbone


def test_width_64_is_torchvision_resnet18_with_groupnorm():
    ref = torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(c // 16, c))
    ref.fc = nn.Identity()
    ours = ResNet18Backbone(64, 16)
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names and shapes
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(ours.eval()(x), ref.eval()(x), atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())


def test_preprocessing_resizes_crops_and_scales():
    cfg = preset("tiny").model
    cfg.encoder.mode, cfg.encoder.image_size, cfg.encoder.crop_ratio = "vision", (40, 40), 0.8
    cfg.encoder.cameras, cfg.encoder.backbone_width = ("cam_high",), 16
    enc = ObservationEncoder(cfg)
    images = torch.full((3, 80, 80, 3), 255, dtype=torch.uint8)
    images[:, :40] = 0
    enc.eval()
    x = enc.preprocess(images)
    assert x.shape == (3, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x[:, :, 0], torch.zeros(3, 3, 32)) and torch.allclose(x[:, :, -1], torch.ones(3, 3, 32))
    enc.train()
    crops = enc.preprocess(images[:1].expand(64, -1, -1, -1), generator=torch.Generator().manual_seed(0))
    assert crops.shape == (64, 3, 32, 32)
    assert len({int(c[0, :, 0].sum()) for c in crops}) > 1  # random offsets differ between images


def _region_encoder(region):
    cfg = preset("tiny").model
    cfg.encoder.mode, cfg.encoder.image_size, cfg.encoder.crop_ratio = "vision", (32, 32), 1.0
    cfg.encoder.cameras, cfg.encoder.backbone_width = ("cam_high", "cam_left_wrist"), 16
    cfg.encoder.camera_regions = {"cam_high": region}
    return ObservationEncoder(cfg).eval()


def test_camera_region_is_cut_before_the_resize_and_only_for_its_camera():
    # A 100x200 frame: grey outside rows 40-69 x columns 50-149, and inside that region a black left half
    # (columns 50-99) and a white right half. The region (0.4, 0.25, 0.3, 0.5) is exactly that window.
    images = torch.full((2, 100, 200, 3), 128, dtype=torch.uint8)
    images[:, 40:70, 50:100] = 0
    images[:, 40:70, 100:150] = 255
    enc = _region_encoder((0.4, 0.25, 0.3, 0.5))
    x = enc.preprocess(images, camera="cam_high")
    assert x.shape == (2, 3, 32, 32)
    assert x[..., :15].max() < 1e-6 and x[..., 17:].min() > 1 - 1e-6  # no grey: nothing outside the region
    whole = enc.preprocess(images, camera="cam_left_wrist")  # no region: the whole frame, grey border kept
    assert torch.allclose(whole[:, :, 0], torch.full((2, 3, 32), 128 / 255), atol=1e-6)
    # A frame already at image_size is taken as cut and resized before (the training cache's frames).
    small = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(enc.preprocess(small, camera="cam_high"), small.permute(0, 3, 1, 2).float() / 255)
