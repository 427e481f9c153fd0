"""Observation encoder: images, joint positions and task id over T_o steps -> state feature s_t
(Section 3: the task index is part of the state; B.3 'Observation encoder').

Notation (code name -> paper symbol)

    s          s_t in R^{d_s}, d_s = model.encoder.state_dim, shared by gates, basis and experts
    qpos       the T_o most recent joint positions (normalized by the policy's normalizer)
    task       the task index (an embedding, part of the state)

Vision mode: one ResNet-18 per camera (separate weights, torchvision BasicBlocks, BatchNorm replaced
by GroupNorm(C // 16 groups, C) as Diffusion Policy does, because BatchNorm statistics are unreliable
under the small, correlated batches of behaviour cloning and under EMA weights), global-average
pooled to 8w features (w = backbone_width; 512 for the torchvision resnet18 width 64).
Preprocessing happens here so that every caller gets it right: uint8 (.., H, W, 3) -> float [0, 1],
the camera's region of interest cut (``camera_regions``, when it has one), resize to image_size, then a
crop of crop_ratio x image_size, random per image in training and centred in eval mode.
Lowdim mode: joint positions and task only (fast CPU experiments).
Object poses (``object_slots`` > 0, either mode): the tracked objects' poses (model/objects.py layout,
normalized by the policy) through their own MLP per step: the state track, joint states + object
poses + task, which a real robot gets from a tracker's topic.
Fusion: per step [proprio MLP(qpos_t), object MLP(objects_t), camera features], flattened over T_o,
concatenated with the task embedding, then Linear -> Mish -> Linear to d_s.

Shared frames (training): a segment of L consecutive windows of T_o frames holds only L + T_o - 1
distinct frames. ``forward(..., frame_index=idx)`` takes the distinct frames (M, N_cam, H, W, 3) and
the (N, T_o) index of each window's frames among them, runs each backbone once per distinct frame
and gathers the features, which is what per-window encoding computes (the backbone treats every image
independently: GroupNorm normalises within one image) at a fraction of the cost. A training crop is
drawn once per distinct frame, so a frame shared by two windows is cropped alike in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from smp_ros.config import ModelConfig
from smp_ros.model.basis import mlp


def to_model_input(images: torch.Tensor, size: tuple[int, int],
                   region: tuple[float, float, float, float] | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, h, w) in [0, 1] at ``size``: the camera's region of interest
    (top, left, height, width as fractions of the frame; ``model.encoder.camera_regions``) cut first, then
    an antialiased bilinear resize. A frame already at ``size`` is taken as fitted (cut and resized before,
    as the frames training keeps at the model's size) and only converted. The one fitting every path uses:
    the encoder's preprocessing and ``DatasetCache.images_at``."""
    x = images.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if region is not None:
        H, W = x.shape[-2:]
        top, left = round(region[0] * H), round(region[1] * W)
        height, width = max(1, round(region[2] * H)), max(1, round(region[3] * W))
        x = x[:, :, top:min(H, top + height), left:min(W, left + width)]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return x


class ResNet18Backbone(nn.Module):
    """torchvision's ResNet-18 topology (same module names, so resnet18's state dict loads into it at
    width 64) with a configurable base width and GroupNorm; returns pooled (N, 8w) features."""

    def __init__(self, width: int = 64, group_size: int = 16) -> None:
        super().__init__()

        def norm(channels: int) -> nn.GroupNorm:
            return nn.GroupNorm(channels // group_size, channels)

        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), norm(planes))
            setattr(self, f"layer{i + 1}", nn.Sequential(
                BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm),
                BasicBlock(planes, planes, norm_layer=norm)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 8 * width
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


class ObservationEncoder(nn.Module):
    """(qpos (N, T_o, D) normalized, images uint8 (N, T_o, N_cam, H, W, 3) | None, task (N,)) -> s (N, d_s)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        enc = cfg.encoder
        self.cfg, self.obs_steps = enc, cfg.obs_steps
        self.vision = enc.mode == "vision"
        self.proprio = mlp([enc.proprio_dim, enc.proprio_hidden, enc.proprio_hidden], final_activation=True)
        self.task_embed = nn.Embedding(enc.num_tasks, enc.task_embed_dim)
        per_step = enc.proprio_hidden
        self.object_dim = enc.object_slots * 7
        if self.object_dim:
            self.objects = mlp([self.object_dim, enc.object_hidden, enc.object_hidden], final_activation=True)
            per_step += enc.object_hidden
        if self.vision:
            self.backbones = nn.ModuleDict({c: ResNet18Backbone(enc.backbone_width, enc.group_norm_groups)
                                            for c in enc.cameras})
            per_step += len(enc.cameras) * 8 * enc.backbone_width
        self.fuse = mlp([cfg.obs_steps * per_step + enc.task_embed_dim, enc.state_dim, enc.state_dim])
        self.channels_last = False  # memory order of the backbones' activations (training speed; same values)

    def crop_size(self) -> tuple[int, int]:
        h, w = self.cfg.image_size
        return max(1, round(h * self.cfg.crop_ratio)), max(1, round(w * self.cfg.crop_ratio))

    def preprocess(self, images: torch.Tensor, generator: torch.Generator | None = None,
                   camera: str | None = None) -> torch.Tensor:
        """uint8 (N, H, W, 3) of ``camera`` -> float (N, 3, h_c, w_c) in [0, 1]: its region cut, resized, cropped."""
        x = to_model_input(images, self.cfg.image_size, self.cfg.camera_regions.get(camera))  # (N, 3, H, W)
        H, W = self.cfg.image_size
        ch, cw = self.crop_size()
        if not self.training:
            top, left = (H - ch) // 2, (W - cw) // 2
            return x[:, :, top:top + ch, left:left + cw]
        N = x.shape[0]
        top = torch.randint(0, H - ch + 1, (N,), device=x.device, generator=generator)
        left = torch.randint(0, W - cw + 1, (N,), device=x.device, generator=generator)
        rows = (top.unsqueeze(1) + torch.arange(ch, device=x.device)).unsqueeze(2)  # (N, ch, 1)
        cols = (left.unsqueeze(1) + torch.arange(cw, device=x.device)).unsqueeze(1)  # (N, 1, cw)
        n = torch.arange(N, device=x.device).reshape(N, 1, 1)
        return x.permute(0, 2, 3, 1)[n, rows, cols].permute(0, 3, 1, 2)  # (N, 3, ch, cw)

    def forward(self, qpos: torch.Tensor, images: torch.Tensor | None, task: torch.Tensor,
                objects: torch.Tensor | None = None, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        """s (N, d_s). ``objects`` (N, T_o, O) normalized object poses when the encoder reads them. Without
        ``frame_index`` images are per window (N, T_o, N_cam, H, W, 3); with it they are distinct frames
        (M, N_cam, H, W, 3) and window n's step j is frame ``frame_index[n, j]`` (module docstring)."""
        N, T = qpos.shape[:2]
        feats = [self.proprio(qpos)]  # (N, T_o, proprio_hidden)
        if self.object_dim:
            if objects is None:
                raise ValueError(f"objects: this encoder reads object poses (N, T_o, {self.object_dim}); none given")
            feats.append(self.objects(objects))  # (N, T_o, object_hidden)
        if self.vision:
            if images is None:
                raise ValueError("images: the vision encoder needs camera frames "
                                 f"(N, T_o, {len(self.cfg.cameras)}, H, W, 3) uint8")
            if frame_index is not None and (frame_index.shape != (N, T) or images.dim() != 5):
                raise ValueError(f"frame_index: expected shape (N, T_o) = {(N, T)} over distinct frames "
                                 f"(M, N_cam, H, W, 3), got {tuple(frame_index.shape)} and images "
                                 f"{tuple(images.shape)}")
            for c, name in enumerate(self.cfg.cameras):
                if frame_index is None:
                    x = self.preprocess(images[:, :, c].reshape(N * T, *images.shape[-3:]), camera=name)  # (N*T_o, 3, h, w)
                    feats.append(self.backbones[name](self._layout(x)).reshape(N, T, -1))  # (N, T_o, 8w)
                else:
                    x = self.preprocess(images[:, c], camera=name)  # (M, 3, h, w)
                    feats.append(self.backbones[name](self._layout(x))[frame_index])  # (N, T_o, 8w)
        per_step = torch.cat(feats, dim=-1).flatten(1)  # (N, T_o * per_step)
        return self.fuse(torch.cat([per_step, self.task_embed(task)], dim=-1))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last activations let oneDNN's CPU convolutions skip a reorder before and after each
        # layer; the values are the same, only the memory order differs.
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
