"""A YOLOv8-style network for the tests, written as Ultralytics writes its blocks (module names,
forwards), which cannot be imported here: conv-BN-SiLU ``Conv``, ``Bottleneck``, ``C2f`` (a
convolution's output chunked in two halves, a chain of bottlenecks on the second, every piece
concatenated into the last convolution), ``SPPF`` (three chained 5x5 max-pools, all four maps
concatenated), and a neck step: nearest ``nn.Upsample`` and concatenation with a lateral map. Small
widths; a global-average-pool classifier on top, so the suite's training helpers apply.
"""

from __future__ import annotations

import torch
from torch import nn


class Conv(nn.Module):
    """Ultralytics' ``Conv``: ``conv`` (k x k, padding k // 2, no bias), ``bn``, ``act`` (SiLU)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = act if act is not None else nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """``cv1`` 3x3, ``cv2`` 3x3, plus the input when ``add`` (Ultralytics' ``Bottleneck``, e=1.0)."""

    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """Ultralytics' ``C2f``: ``cv1`` to 2c channels, chunked in two; ``m`` (n bottlenecks) chained on
    the second half; the 2 + n pieces concatenated into ``cv2``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c = c2 // 2
        self.cv1 = Conv(c1, 2 * c, 1)
        self.cv2 = Conv((2 + n) * c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Ultralytics' ``SPPF``: ``cv1`` to half the channels, three chained ``m`` (5x5 max-pool, stride 1),
    the four maps concatenated into ``cv2``."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YoloLike(nn.Module):
    """Backbone (two stride-2 ``Conv``, ``C2f`` with shortcuts, a stride-2 ``Conv``, ``C2f``, ``SPPF``),
    neck (``nn.Upsample(scale_factor=2, mode="nearest")``, concatenation with the first ``C2f``'s map,
    ``C2f`` without shortcuts), then average pool and ``fc``. Input (N, 3, H, W), H and W divisible by 8;
    output (N, num_classes) logits."""

    def __init__(self, num_classes: int = 10, w: int = 8) -> None:
        super().__init__()
        self.stem = Conv(3, w, 3, 2)
        self.down1 = Conv(w, 2 * w, 3, 2)
        self.c2f1 = C2f(2 * w, 2 * w, 1, shortcut=True)
        self.down2 = Conv(2 * w, 4 * w, 3, 2)
        self.c2f2 = C2f(4 * w, 4 * w, 2, shortcut=True)
        self.sppf = SPPF(4 * w, 4 * w)
        self.up = nn.Upsample(None, 2, "nearest")
        self.neck = C2f(6 * w, 2 * w, 1, shortcut=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        p3 = self.c2f1(self.down1(self.stem(x)))
        p4 = self.sppf(self.c2f2(self.down2(p3)))
        y = self.neck(torch.cat([self.up(p4), p3], 1))
        return self.fc(torch.flatten(self.pool(y), 1))
