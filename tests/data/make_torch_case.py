"""Regenerate torch_batchnorm2d.npz: a torch.nn.BatchNorm2d state dict (after a few training
steps), an input, and torch's eval/train outputs and gradients for it.

Run with PyTorch installed: python tests/data/make_torch_case.py
"""

from pathlib import Path

import numpy as np
import torch

torch.manual_seed(0)
bn = torch.nn.BatchNorm2d(4, momentum=0.1)
with torch.no_grad():
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-1.0, 1.0)
for _ in range(3):
    bn(torch.randn(8, 4, 3, 3) * 2 + 1)
case = {f"state.{k}": v.numpy().copy() for k, v in bn.state_dict().items()}
x = (torch.randn(5, 4, 3, 3) * 3 - 2).requires_grad_(True)
bn.eval()
case["y_eval"] = bn(x).detach().numpy()
bn.train()
y = bn(x)
dy = torch.randn_like(y)
y.backward(dy)
case.update(x=x.detach().numpy(), y_train=y.detach().numpy(), dy=dy.numpy(),
            dx=x.grad.numpy(), dweight=bn.weight.grad.numpy(), dbias=bn.bias.grad.numpy(),
            running_mean_after=bn.running_mean.numpy(), running_var_after=bn.running_var.numpy())
np.savez(Path(__file__).with_name("torch_batchnorm2d.npz"), **case)
