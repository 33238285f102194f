"""Polyp-PVT (Dong et al., 2021) on timm's PVTv2 backbones: the KDAS teacher (B2) and student (B0).

The decoder follows the released Polyp-PVT code: a Cascaded Fusion Module (CFM) over the three
deepest stages gives the first prediction P1; a Camouflage Identification Module (CIM: channel then
spatial attention) cleans the shallowest stage, and a Similarity Aggregation Module (SAM, a small
graph convolution) fuses it with the CFM output for the second prediction P2. Both are upsampled 8x
to full resolution, as KDAS distils them. Backbones are built with pretrained=False: nothing can be
downloaded here, so every run trains from scratch.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicConv2d(nn.Sequential):
    """conv (no bias: BatchNorm follows) + BatchNorm + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0):
        super().__init__(nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(x: torch.Tensor, times: int = 1) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2**times, mode="bilinear", align_corners=True)


class CFM(nn.Module):
    """Cascaded fusion: the deepest map gates the shallower ones on the way up (to stride 8)."""

    def __init__(self, ch: int):
        super().__init__()
        self.up1, self.up2, self.up3, self.up4 = (BasicConv2d(ch, ch, 3, 1) for _ in range(4))
        self.up5 = BasicConv2d(2 * ch, 2 * ch, 3, 1)
        self.concat2 = BasicConv2d(2 * ch, 2 * ch, 3, 1)
        self.concat3 = BasicConv2d(3 * ch, 3 * ch, 3, 1)
        self.out = BasicConv2d(3 * ch, ch, 3, 1)

    def forward(self, x4, x3, x2):  # strides 32, 16, 8
        x3_1 = self.up1(_up(x4)) * x3
        x2_1 = self.up2(_up(x4, 2)) * self.up3(_up(x3)) * x2
        x3_2 = self.concat2(torch.cat((x3_1, self.up4(_up(x4))), 1))
        x2_2 = self.concat3(torch.cat((x2_1, self.up5(_up(x3_2))), 1))
        return self.out(x2_2)


class CIM(nn.Module):
    """Channel attention (avg + max pooled, shared MLP) then 7x7 spatial attention."""

    def __init__(self, ch: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Conv2d(ch, ch // 16, 1, bias=False), nn.ReLU(),
                                nn.Conv2d(ch // 16, ch, 1, bias=False))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x):
        x = x * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)) + self.fc(F.adaptive_max_pool2d(x, 1)))
        pooled = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1)
        return x * torch.sigmoid(self.spatial(pooled))


class GCN(nn.Module):
    """One graph convolution over the SAM's nodes (node mixing, residual, then state mixing)."""

    def __init__(self, num_state: int, num_node: int):
        super().__init__()
        self.node = nn.Conv1d(num_node, num_node, 1)
        self.state = nn.Conv1d(num_state, num_state, 1, bias=False)

    def forward(self, x):  # B x state x node
        h = self.node(x.transpose(1, 2)).transpose(1, 2) - x
        return F.relu(self.state(h))


class SAM(nn.Module):
    """Similarity aggregation: project the CFM map onto mids^2 anchor nodes pooled from the
    CIM-gated map, reason over them with a GCN, project back, add as a residual."""

    def __init__(self, ch: int = 32, mid: int = 16, mids: int = 4):
        super().__init__()
        self.mid = mid
        self.priors = nn.AdaptiveAvgPool2d(mids + 2)
        self.conv_state = nn.Conv2d(ch, mid, 1)
        self.conv_proj = nn.Conv2d(ch, mid, 1)
        self.gcn = GCN(mid, mids * mids)
        self.conv_extend = nn.Conv2d(mid, ch, 1, bias=False)

    def forward(self, x, edge):
        b, _, h, w = x.shape
        edge = F.interpolate(edge, size=(h, w))
        # As released: channel 1 of a channel softmax of the CIM features acts as the gate.
        edge = torch.softmax(edge, dim=1)[:, 1:2]
        state = self.conv_state(x).view(b, self.mid, -1)
        proj = self.conv_proj(x)
        # The border ring of the (mids+2)^2 pooled grid is dropped: mids^2 interior anchors remain.
        anchors = self.priors(proj * edge)[:, :, 1:-1, 1:-1].reshape(b, self.mid, -1)
        assign = torch.softmax(anchors.transpose(1, 2) @ proj.view(b, self.mid, -1), dim=1)
        nodes = self.gcn(state @ assign.transpose(1, 2))
        return x + self.conv_extend((nodes @ assign).view(b, self.mid, h, w))


class PolypPVT(nn.Module):
    """Polyp-PVT: forward(x) -> (P1, P2, features); P1/P2 are B x 1 x H x W logits at input size,
    features the four backbone stages (strides 4, 8, 16, 32)."""

    def __init__(self, backbone: str = "pvt_v2_b2", channel: int = 32):
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True)
        c1, c2, c3, c4 = self.backbone.feature_info.channels()
        self.trans1 = BasicConv2d(c1, channel, 1)
        self.trans2, self.trans3, self.trans4 = (BasicConv2d(c, channel, 1) for c in (c2, c3, c4))
        self.cfm = CFM(channel)
        self.cim = CIM(c1)
        self.sam = SAM(channel)
        self.out_cfm = nn.Conv2d(channel, 1, 1)
        self.out_sam = nn.Conv2d(channel, 1, 1)

    def forward(self, x):
        feats = self.backbone(x)
        f1, f2, f3, f4 = feats
        cfm = self.cfm(self.trans4(f4), self.trans3(f3), self.trans2(f2))
        cim = F.interpolate(self.trans1(self.cim(f1)), scale_factor=0.5, mode="bilinear",
                            align_corners=True)
        sam = self.sam(cfm, cim)
        size = x.shape[-2:]
        p1 = F.interpolate(self.out_cfm(cfm), size=size, mode="bilinear")
        p2 = F.interpolate(self.out_sam(sam), size=size, mode="bilinear")
        return p1, p2, feats


def kdas_teacher() -> PolypPVT:
    return PolypPVT("pvt_v2_b2")


def kdas_student() -> PolypPVT:
    return PolypPVT("pvt_v2_b0")
