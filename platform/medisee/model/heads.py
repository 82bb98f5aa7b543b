"""Small heads on top of the MLLM's candidate-token states."""

from __future__ import annotations

import torch
from torch import nn


class Router(nn.Module):
    """Fuses the n candidate-token states: gate Linear(n·d,1024)-GELU-Linear(1024,n), sigmoid weights normalised to 1.

    The gate sees the candidates in order ([SEG], [BBOX], ...); the official release concatenates
    [BBOX] first, which `checkpoint.convert_official_state_dict` permutes on import.
    """

    def __init__(self, hidden_size: int, num_candidates: int, gate_hidden: int = 1024):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Linear(num_candidates * hidden_size, gate_hidden),
            nn.GELU(),
            nn.Linear(gate_hidden, num_candidates),
        )

    def weights(self, candidates: torch.Tensor) -> torch.Tensor:
        """candidates (B, n, d) -> (B, n) non-negative weights summing to 1."""
        gates = torch.sigmoid(self.gate(candidates.flatten(1)))
        return gates / gates.sum(-1, keepdim=True).clamp_min(1e-6)

    def forward(self, candidates: torch.Tensor) -> torch.Tensor:
        return (self.weights(candidates).unsqueeze(-1) * candidates).sum(1)


class TextProjection(nn.Module):
    """Fused state -> one sparse prompt token for SAM: Linear(d,d)-ReLU-Linear(d,prompt_dim)."""

    def __init__(self, hidden_size: int, prompt_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, prompt_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class BoxDecoder(nn.Module):
    """Fused state -> normalised (cx, cy, w, h): Linears d-512-512-4 with ReLU between, sigmoid.

    A ModuleList of the three Linears, named as in the official release (`layers.{0,1,2}`);
    the last layer is zero-initialised, as there.
    """

    def __init__(self, hidden_size: int, width: int = 512):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(hidden_size, width), nn.Linear(width, width), nn.Linear(width, 4)]
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return torch.sigmoid(self.layers[-1](x))
