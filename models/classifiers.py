"""The LTG networks: several timm teachers, a 52 k-parameter student CNN and the multi-head
attention fusion of the teachers' embeddings.

Every network returns (logits B x K, embedding B x E): the response and the feature that LTG
distils. The teachers are standard timm classifiers (pretrained=False); the fusion is how several
teachers become one target: their embeddings are projected to a common width and attended by a
learned query with torch's scaled_dot_product_attention, so each sample weighs its teachers.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

LTG_TEACHERS = ("resnet18", "efficientnet_b0", "mobilenetv3_large_100")


class TimmClassifier(nn.Module):
    def __init__(self, name: str, num_classes: int):
        super().__init__()
        self.net = timm.create_model(name, pretrained=False, num_classes=num_classes)

    def forward(self, x):
        emb = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.net.get_classifier()(emb), emb


class TeacherEnsemble(nn.ModuleList):
    """The teachers side by side: forward -> list of (logits, embedding), one per teacher."""

    def __init__(self, num_classes: int, names=LTG_TEACHERS):
        super().__init__(TimmClassifier(name, num_classes) for name in names)
        self.names = list(names)

    def keep(self, members: list[int]) -> None:
        """Keep only these teachers (indices, in this order): an ensemble chosen on validation data."""
        kept = [(self.names[i], self[i]) for i in members]
        for i in reversed(range(len(self))):
            del self[i]
        self.extend(net for _, net in kept)
        self.names = [name for name, _ in kept]

    def forward(self, x):
        return [teacher(x) for teacher in self]

    @property
    def embed_dims(self) -> list[int]:
        # pre_logits width: the head's hidden size where the head has one (MobileNetV3).
        return [getattr(t.net, "head_hidden_size", t.net.num_features) for t in self]


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class TinyStudent(nn.Module):
    """Four 3x3 conv stages (16-32-48-74 channels), max-pooled between, global average pooling and
    a linear classifier: 51.8 k parameters, the size of LTG's student."""

    def __init__(self, num_classes: int, widths=(16, 32, 48, 74)):
        super().__init__()
        layers, cin = [], 3
        for i, cout in enumerate(widths):
            layers += [_conv(cin, cout)] + ([nn.MaxPool2d(2)] if i < len(widths) - 1 else [])
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        self.embed_dim = cin

    def forward(self, x):
        emb = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.fc(emb), emb


class AttentionFusion(nn.Module):
    """Multi-head attention of a learned query over the teachers' projected embeddings.

    forward(list of B x d_i) -> (fused B x dim, logits B x K); the classifier on the fused
    embedding trains the fusion with the labels, so it stays discriminative rather than
    collapsing onto whatever the student produces."""

    def __init__(self, dims: list[int], num_classes: int, dim: int = 128, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.proj = nn.ModuleList(nn.Linear(d, dim) for d in dims)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, num_classes)

    def _split(self, x):  # B x T x dim -> B x heads x T x dim/heads
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, embeddings: list[torch.Tensor]):
        tokens = torch.stack([p(e) for p, e in zip(self.proj, embeddings)], 1)  # B x teachers x dim
        k, v = self.kv(tokens).chunk(2, -1)
        q = self.q(self.query.expand(len(tokens), -1, -1))
        fused = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        fused = self.out(fused.transpose(1, 2).flatten(2)[:, 0])
        return fused, self.fc(fused)
