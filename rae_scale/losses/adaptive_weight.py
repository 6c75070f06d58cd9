"""The adaptive GAN weight from gradients w.r.t. the decoder's last layer, under any data parallelism."""
from __future__ import annotations

import torch
import torch.distributed as dist


class LastLayerGrad:
    """Gradient norms w.r.t. a Linear layer's weight, from its recorded input and output.

    dL/dW = sum over positions of (dL/dout) (x)^T, so the norm needs only autograd.grad w.r.t. the
    layer's output: it works the same whether the layer sits in DDP, an FSDP2 shard (where the
    weight itself is a sharded DTensor outside the autograd graph) or a DeepSpeed engine.
    """

    def __init__(self, linear: torch.nn.Module):
        self._io = None
        linear.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if torch.is_grad_enabled():
            self._io = (inputs[0], output)

    def weight_grad(self, loss: torch.Tensor) -> torch.Tensor:
        """dL/dW of the rank's local loss, averaged over ranks: the gradient of the global-batch loss."""
        if self._io is None:
            raise RuntimeError("the last layer has not run forward with gradients enabled")
        x, out = self._io
        (g_out,) = torch.autograd.grad(loss, out, retain_graph=True)
        gw = torch.einsum("no,ni->oi", g_out.reshape(-1, g_out.shape[-1]).float(),
                          x.reshape(-1, x.shape[-1]).float())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(gw, op=dist.ReduceOp.SUM)
            gw /= dist.get_world_size()
        return gw

    def adaptive_weight(self, rec_loss: torch.Tensor, gan_loss: torch.Tensor, max_weight: float = 1e4,
                        eps: float = 1e-6) -> torch.Tensor:
        """VQGAN's lambda = ||dL_rec/dW|| / (||dL_gan/dW|| + eps), clamped to [0, max_weight], detached.

        Unlike upstream (each rank's local graph) the gradients are those of the global batch, so the
        weight, and the run, do not depend on the number of ranks.
        """
        w = self.weight_grad(rec_loss).norm() / (self.weight_grad(gan_loss).norm() + eps)
        return w.clamp(0.0, max_weight).detach()
