"""The paper's MLP: d-width-width-C with ReLU; only the first layer has a bias (as in the paper code)."""
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self, input_dim, hidden_dims, num_classes):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(input_dim, hidden_dims[0])])
        for d_in, d_out in zip(hidden_dims[:-1], hidden_dims[1:]):
            self.layers.append(nn.Linear(d_in, d_out, bias=False))
        self.layers.append(nn.Linear(hidden_dims[-1], num_classes, bias=False))

    def forward(self, x):
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = layer(h).relu()
        return self.layers[-1](h)


def mlp(input_dim, num_classes=10, width=1000):
    return MLP(input_dim, [width, width], num_classes)
