"""Turn a pruned nn.Module into the graph a backend runs.

Steps: fold BatchNorm (fold.py), fuse each conv with what follows it where the kernel's
epilogue can take it (a ZeroPad2d before it, a residual add after it, then ReLU/ReLU6), and put
an op module from backends.py or lowering.py in each conv's place under the conv's own name, so
metrics and cards say "layer1.0.conv2" whatever backend runs it. Everything else stays torch.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from service.engine import fold
from service.engine.backends import ConvGeometry, ConvLayer, ConvOp

_ADDS = (operator.add, operator.iadd, torch.add)
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}

OpFactory = Callable[[ConvLayer], ConvOp]


@dataclass
class PreparedModel:
    """A model ready to be materialized for any backend: a template whose conv call sites
    already carry their fused arguments, and the fused conv layers by name."""

    template: nn.Module
    layers: dict[str, ConvLayer]
    input_shape: tuple[int, int, int]
    traced: bool
    linear_sparsity: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _pad4(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    if isinstance(conv.padding, str):
        raise ValueError(f"padding={conv.padding!r} convs are not supported; use explicit pads")
    ph, pw = _pair(conv.padding)
    return (pw, pw, ph, ph)


def _activation_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    if node.op == "call_module":
        return _ACT_MODULES.get(type(gm.get_submodule(str(node.target))))
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        # F.relu(x, inplace=True) still means relu; extra positional args would not.
        return _ACT_FUNCTIONS[node.target] if len(node.args) == 1 else None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "relu"
    if node.op == "call_function" and node.target in (F.hardtanh, F.hardtanh_):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return "relu6" if (low, high) == (0.0, 6.0) else None
    return None


def _sole_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_add(node: torch.fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:  # torch.add(..., alpha=) is not a plain residual
        return False
    if node.op == "call_method":
        return node.target in ("add", "add_")
    return node.op == "call_function" and node.target in _ADDS


def _fuse(gm: torch.fx.GraphModule, conv_node: torch.fx.Node) -> ConvLayer:
    """Rewrite one conv call site in place to absorb its neighbours; return its layer."""
    name = str(conv_node.target)
    conv = gm.get_submodule(name)
    x = conv_node.args[0]
    padding = _pad4(conv)
    pad_node = x if isinstance(x, torch.fx.Node) and x.op == "call_module" else None
    pad_mod = gm.get_submodule(str(pad_node.target)) if pad_node is not None else None
    if isinstance(pad_mod, nn.ZeroPad2d) and _sole_user(pad_node) is conv_node:
        extra = pad_mod.padding
        padding = tuple(p + e for p, e in zip(padding, extra, strict=True))
        x = pad_node.args[0]
    else:
        pad_node = None
    in_shape = fold.node_shape(x)
    out_shape = fold.node_shape(conv_node)
    if in_shape is None or out_shape is None:
        raise RuntimeError(f"no shape recorded for {name}; was the graph shape-propagated?")

    last, residual, activation = conv_node, None, None
    user = _sole_user(conv_node)
    if user is not None and _is_add(user):
        other = user.args[1] if user.args[0] is conv_node else user.args[0]
        if isinstance(other, torch.fx.Node) and fold.node_shape(other) == out_shape:
            last, residual = user, other
            user = _sole_user(user)
    if user is not None and _activation_of(gm, user) is not None:
        activation = _activation_of(gm, user)
        last = user

    args = (x,) if residual is None else (x, residual)
    # The fused call goes where the chain ended: a residual branch (ResNet's downsample) is
    # traced after conv3, so only that position sees both inputs defined.
    with gm.graph.inserting_before(last):
        fused = gm.graph.call_module(name, args)
    fused.meta = dict(conv_node.meta)
    last.replace_all_uses_with(fused)
    node = last
    while node is not conv_node:
        prev = node.args[0] if node.args[0] is not residual else node.args[1]
        gm.graph.erase_node(node)
        node = prev
    gm.graph.erase_node(conv_node)
    if pad_node is not None:
        gm.graph.erase_node(pad_node)

    geometry = ConvGeometry(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel=_pair(conv.kernel_size),
        stride=_pair(conv.stride),
        padding=padding,
        dilation=_pair(conv.dilation),
        groups=conv.groups,
        in_hw=(in_shape[2], in_shape[3]),
        out_hw=(out_shape[2], out_shape[3]),
        activation=activation,
        residual=residual is not None,
    )
    bias = None if conv.bias is None else conv.bias.detach().float().clone()
    return ConvLayer(name, geometry, conv.weight.detach().float().clone(), bias)


def _prepare_traced(gm: torch.fx.GraphModule, input_shape) -> PreparedModel:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    layers: dict[str, ConvLayer] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Conv2d):
            continue
        if counts[str(node.target)] != 1:
            raise ValueError(f"conv {node.target} is called more than once; not supported")
        layers[str(node.target)] = _fuse(gm, node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return PreparedModel(gm, layers, input_shape, traced=True)


def _prepare_untraced(model: nn.Module, input_shape) -> PreparedModel:
    """Fallback for models fx cannot trace: swap convs in place, no folding, no fusion."""
    model = fold.copy_model(model).eval().float()
    fold.make_pruning_permanent(model)
    shapes: dict[str, tuple] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):

            def record(m, inputs, output, name=name):
                shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))

            hooks.append(mod.register_forward_hook(record))
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    layers = {}
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d) or name not in shapes:
            continue
        (_, _, ih, iw), (_, _, oh, ow) = shapes[name]
        geometry = ConvGeometry(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel=_pair(conv.kernel_size),
            stride=_pair(conv.stride),
            padding=_pad4(conv),
            dilation=_pair(conv.dilation),
            groups=conv.groups,
            in_hw=(ih, iw),
            out_hw=(oh, ow),
        )
        bias = None if conv.bias is None else conv.bias.detach().float().clone()
        layers[name] = ConvLayer(name, geometry, conv.weight.detach().float().clone(), bias)
    notes = ["not traceable by torch.fx: BatchNorm not folded, epilogues not fused"]
    return PreparedModel(model, layers, input_shape, traced=False, notes=notes)


def prepare_model(model: nn.Module, input_shape: tuple[int, int, int]) -> PreparedModel:
    """Fold, fuse and measure shapes once; materialize() then makes each backend's graph."""
    gm = fold.prepare(model, input_shape)
    prepared = _prepare_traced(gm, input_shape) if gm is not None else None
    if prepared is None:
        prepared = _prepare_untraced(model, input_shape)
    for name, mod in prepared.template.named_modules():
        if isinstance(mod, nn.Linear):
            zeros = int((mod.weight == 0).sum())
            prepared.linear_sparsity[name] = zeros / mod.weight.numel()
    return prepared


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def materialize(prepared: PreparedModel, make_op: OpFactory) -> nn.Module:
    """A fresh copy of the template with every conv replaced by make_op(layer)."""
    model = copy.deepcopy(prepared.template)
    for name, layer in prepared.layers.items():
        set_submodule(model, name, make_op(layer))
    return model.eval()
