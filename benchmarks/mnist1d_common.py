"""Data and models shared by the MNIST-1D benchmarks (gradual_vs_peers.py, dst_vs_peers.py)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_mnist1d():
    from mnist1d.data import get_dataset_args, make_dataset
    d = make_dataset(get_dataset_args())  # generated locally; never get_dataset() (it downloads)
    return (torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.long),
            torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.long))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(40, 256)
        self.fc2 = nn.Linear(256, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 32, 5, padding=2)             # 40 -> 40
        self.conv2 = nn.Conv1d(32, 64, 5, stride=2, padding=2)  # 40 -> 20
        self.conv3 = nn.Conv1d(64, 64, 5, stride=2, padding=2)  # 20 -> 10
        self.head = nn.Linear(64 * 10, 10)

    def forward(self, x):
        x = x.unsqueeze(1)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.flatten(1))
