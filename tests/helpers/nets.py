"""The smallest model with the zoo interface, and random batches for it (method and DSKD tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """Smallest model with the zoo interface (forward_features / forward_head / num_features / fc)."""

    pooled_linear_head = True  # forward_head is mean over positions + fc: DSKD may use closed-form guidance

    def __init__(self, width: int = 16, num_classes: int = 4, stride: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.num_features = width
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(f, 1).flatten(1)  # pre_logits: the pooled vector (zoo/timm convention)
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def batch(n: int = 8, num_classes: int = 4, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch of 3-channel images and labels for TinyNet."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes, each a fixed random 3×8×8 pattern plus noise."""
    protos = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return protos[y] + 1.0 * torch.randn(n, 3, 8, 8, generator=g), y


def trained_tiny_teacher() -> TinyNet:
    """A TinyNet(32) trained on `synthetic` to over 90% held-out top-1: a teacher worth distilling."""
    torch.manual_seed(0)
    model = TinyNet(32)
    x, y = synthetic(512, seed=1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = synthetic(256, seed=3)
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() > 0.9
    return model


def fresh_teacher(teacher: TinyNet) -> TinyNet:
    """A copy of `teacher` a Distiller may freeze and move without touching the shared one."""
    copy = TinyNet(32)
    copy.load_state_dict(teacher.state_dict())
    return copy


def grads_by_term(d, losses: dict[str, torch.Tensor], params: list[torch.nn.Parameter]) -> dict[str, float]:
    """Gradient norm each loss term alone sends into `params` (0 when no path)."""
    out = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = sum(float(g.abs().sum()) for g in grads if g is not None)
    return out


def train_history(d, x: torch.Tensor, y: torch.Tensor, steps: int = 40, lr: float = 3e-3,
                  seed: int = 10) -> list[dict[str, float]]:  # type: ignore[no-untyped-def]
    """Adam steps of distiller `d` on random batches of 32 from (x, y); the loss terms per step."""
    opt = torch.optim.Adam(d.trainable_parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        _, losses = d(x[idx], y[idx], progress=step / steps)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    return history
