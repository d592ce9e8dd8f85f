"""Eval-mode BatchNorm made cheap to differentiate twice: torch.fx conv/BatchNorm folding and affine BatchNorm.

The result is the same function of the same named parameters, so the same
Hessian; ``_fast_eval_model`` says why and what it saves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _uses_running_stats(module: nn.Module) -> bool:
    return (
        type(module) in _BATCHNORMS
        and module.track_running_stats  # type: ignore[union-attr]
        and module.running_mean is not None
        and module.running_var is not None
    )


def _fast_eval_model(model: nn.Module, names: list[str]) -> nn.Module:
    """The same function of the same named parameters, with eval-mode BatchNorm made cheap to differentiate twice.

    PyTorch's batch-norm double backward is written for train mode and was ~30% of
    a BN-CNN's HVP time. In eval mode BN is y = x * scale + shift per channel;
    folded into the preceding convolution's weight (conv(x, W * scale) + ...) its
    second derivatives touch weight-sized tensors instead of activations. Measured
    on the benchmark's BN-CNN: HVP 0.55x the time of the unmodified model.
    """
    if not any(_uses_running_stats(m) for m in model.modules()):
        return model  # nothing to gain from tracing
    fused = _fuse_conv_bn(model, names)
    if fused is not None:
        model = fused
    _affine_batchnorms(model)  # BNs not right after a convolution
    return model


def _conv_bn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    eps: float,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """BatchNorm(eval) after a zero-padded convolution, as one convolution with folded weight and bias."""
    scale = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        scale = bn_weight * scale
    shift = -running_mean * scale if bias is None else (bias - running_mean) * scale
    if bn_bias is not None:
        shift = shift + bn_bias
    w = weight * scale.view((-1,) + (1,) * (weight.dim() - 1))
    return _CONV_FNS[weight.dim() - 2](x, w, shift, stride, padding, dilation, groups)


def _fuse_conv_bn(model: nn.Module, names: list[str]) -> nn.Module | None:
    """A torch.fx copy with every conv -> eval BatchNorm pair folded into ``_conv_bn``, or None if none or untraceable."""
    from torch import fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: keep the module as it is
        return None
    modules = dict(gm.named_modules())
    graph = gm.graph
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not _uses_running_stats(modules.get(node.target, nn.Identity())):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(src.target)
        if type(conv) not in _CONVS or conv.padding_mode != "zeros" or len(src.args) != 1 or src.kwargs:
            continue
        bn = modules[node.target]
        if bn.num_features != conv.out_channels:
            continue

        def attr(owner: str, name: str, mod: nn.Module) -> fx.Node | None:
            return graph.get_attr(f"{owner}.{name}") if getattr(mod, name) is not None else None

        with graph.inserting_before(node):
            new = graph.call_function(
                _conv_bn,
                args=(
                    src.args[0],
                    attr(src.target, "weight", conv),
                    attr(src.target, "bias", conv),
                    attr(node.target, "weight", bn),
                    attr(node.target, "bias", bn),
                    attr(node.target, "running_mean", bn),
                    attr(node.target, "running_var", bn),
                ),
                kwargs={
                    "eps": bn.eps,
                    "stride": conv.stride,
                    "padding": conv.padding,
                    "dilation": conv.dilation,
                    "groups": conv.groups,
                },
            )
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(src)
        fused += 1
    if not fused:
        return None
    graph.lint()
    gm.recompile()
    # functional_call addresses parameters by name: the traced copy must hold exactly
    # the model's (a module the forward never calls would be missing from it).
    if sorted(n for n, p in gm.named_parameters() if p.requires_grad) != sorted(names):
        return None
    return gm


class _EvalBatchNorm(nn.Module):
    """BatchNorm in eval mode as the per-channel affine map it is, with the same parameters and buffers."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        # Same names, same order: functional_call and masks address them unchanged.
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = self.weight * scale
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = self.bias + shift
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape) + shift.view(shape)


def _affine_batchnorms(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _uses_running_stats(child):
                setattr(parent, name, _EvalBatchNorm(child))  # type: ignore[arg-type]

