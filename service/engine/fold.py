"""Graph preparation: make pruning permanent, trace with torch.fx, fold BatchNorm into convs.

Folding is exact algebra on eval-mode statistics: conv(x) * s + t with s = gamma / sqrt(var + eps)
and t = beta - mean * s becomes a conv with weight W * s and bias b * s + t. Zeros in W stay zeros,
so the sparsity pattern the pruner made is what the kernel sees.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import prune

from service.engine.tracing import GUARD

log = logging.getLogger(__name__)


def make_pruning_permanent(model: nn.Module) -> int:
    """Turn torch.nn.utils.prune reparametrizations (weight_orig * weight_mask) into plain
    weights, so tracing sees ordinary parameters. Returns how many tensors were made permanent."""
    count = 0
    for module in model.modules():
        names = {
            hook._tensor_name
            for hook in module._forward_pre_hooks.values()
            if isinstance(hook, prune.BasePruningMethod)
        }
        for name in sorted(names):
            prune.remove(module, name)
            count += 1
    return count


def copy_model(model: nn.Module) -> nn.Module:
    """deepcopy that also copes with torch.nn.utils.prune: its computed `weight` attributes are
    not graph leaves, which deepcopy refuses; they are copied detached instead."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def trace(model: nn.Module) -> torch.fx.GraphModule | None:
    """Symbolically trace the model; None when its Python is not traceable (data-dependent
    control flow), in which case the caller falls back to module swapping. The GraphModule
    shares the model's submodules: copy the model first if it must stay as it is."""
    try:
        with GUARD.tracing():  # fx patches every module's __call__ while it traces
            return torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError)
        log.warning(
            "torch.fx could not trace %s (%s); convs run unfused", type(model).__name__, exc
        )
        return None


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode BatchNorm statistics into the conv's weight and bias, in place."""
    with torch.no_grad():
        weight = conv.weight.double()
        mean = bn.running_mean.double()
        var = bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        # float64 keeps the fold's rounding below the fp32 output's own.
        folded_w = (weight * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype)
        folded_b = ((bias - mean) * scale + beta).to(conv.weight.dtype)
        conv.weight.copy_(folded_w)
        conv.bias = nn.Parameter(folded_b, requires_grad=False)


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def module_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def fold_batchnorm(gm: torch.fx.GraphModule) -> list[str]:
    """Fold every BatchNorm2d that directly follows a Conv2d whose only consumer it is.
    Returns the folded conv names. A conv module called twice is left alone (its weights would
    change for both call sites)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    folded = []
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
            continue
        src = node.args[0]
        conv = module_of(gm, src) if isinstance(src, torch.fx.Node) else None
        if not isinstance(conv, nn.Conv2d) or _only_user(src) is not node:
            continue
        if calls[str(src.target)] != 1 or calls[str(node.target)] != 1:
            continue
        fold_conv_bn(conv, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded.append(str(src.target))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def propagate_shapes(gm: torch.fx.GraphModule, sample: torch.Tensor) -> None:
    """Record every node's output shape in node.meta['tensor_meta'] (one CPU pass)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(sample)


def node_shape(node: object) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def prepare(model: nn.Module, input_shape: tuple[int, int, int]) -> torch.fx.GraphModule | None:
    """A traced, BN-folded copy of the model with shapes recorded for a batch of one;
    None when the model cannot be traced. The caller's model is not modified."""
    model = copy_model(model).eval().float()
    make_pruning_permanent(model)
    gm = trace(model)
    if gm is None:
        return None
    fold_batchnorm(gm)
    propagate_shapes(gm, torch.zeros(1, *input_shape))
    return gm
