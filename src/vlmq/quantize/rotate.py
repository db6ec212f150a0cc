"""Orthogonal rotations that leave the float model's function unchanged but spread activation outliers over
all channels, so per-token int8 activations and per-channel int8 weights lose less (QuaRot, SpinQuant).

Column-vector convention: a linear computes y = W x. With an orthogonal Q and x' = Q x, a reader of x keeps
its output with W' = W Q^T; a writer of x produces Q y with W' = Q W, b' = Q b.

- R1, the residual stream (folded, no runtime op): the RMSNorm gains are first folded into the linears that
  read them (the norms become unit gain, and RMSNorm(Q h) = Q RMSNorm(h) for orthogonal Q). Then the
  embedding rows, the vision linears whose outputs replace image-token embeddings (the merger's last linear)
  and every linear that writes the residual (o_proj, down_proj) are rotated by Q; every reader (q/k/v,
  gate/up, lm_head) by Q^T. The final norm's gain goes into lm_head, so a tied lm_head is untied first.
- R2, per attention head on the values (folded): v_proj's rows of each kv-head by Q2, o_proj's columns of
  each query head by Q2^T. One Q2 for all heads, so GQA sharing holds. RoPE is untouched (q/k are not rotated).
- R4, down_proj's input (online): a block-diagonal Sylvester Hadamard H (blocks of `block`, symmetric and
  orthogonal) is folded into down_proj's weight (W' = W H) and applied to its input at run time; the live
  model carries it as a forward pre-hook, the export as a compressed-tensors `transform_config`.

Rotations run in float64 on each tensor's own device and are rounded once to the tensor's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmq.models.families import Family
from vlmq.numerics import block_hadamard, hadamard, hadamard_split, sylvester_hadamard

INPUT_HADAMARD_ATTR = "_vlmq_input_hadamard"   # on a module: the block size of its online input Hadamard
PRECISE_ATTR = "_vlmq_fp32"                    # on a 16-bit parameter: its rotated value in fp32 (`_set`)


class RotationError(ValueError):
    pass


__all__ = ["block_hadamard", "sylvester_hadamard"]   # re-exported from vlmq.numerics


# ----------------------------------------------------------------------------- matrices

def random_orthogonal(n: int, seed: int) -> Tensor:
    """A Haar-random n x n orthogonal matrix (QR of a seeded Gaussian, signs fixed), float64."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotation_kind(n: int, matrix: str = "auto") -> str:
    """What rotation_matrix(n, seed, matrix) builds: 'randomized_hadamard' or 'random_orthogonal'.
    auto: a Hadamard only for a power of two; hadamard: wherever one is constructed (576 = 8 * 72, ...)."""
    split = hadamard_split(n)
    reach = {"auto": split is not None and split[1] == 1, "hadamard": split is not None}.get(matrix, False)
    return "randomized_hadamard" if reach else "random_orthogonal"


def rotation_matrix(n: int, seed: int, matrix: str = "auto") -> Tensor:
    """The n x n rotation `quant.rotate.matrix` names (float64)."""
    if rotation_kind(n, matrix) == "randomized_hadamard":
        return randomized_hadamard(n, seed)
    return random_orthogonal(n, seed)


def randomized_hadamard(n: int, seed: int) -> Tensor:
    """Q = H diag(signs) (QuaRot's randomized Hadamard; H from vlmq.numerics.hadamard, which also reaches
    sizes like 576 and 3584), else, for a size no construction reaches, a random orthogonal Q."""
    if hadamard_split(n) is None:
        return random_orthogonal(n, seed)
    h = hadamard(n)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return h * signs.unsqueeze(0)


def largest_block(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    block = 1
    while block * 2 <= cap and n % (block * 2) == 0:
        block *= 2
    return block


# ----------------------------------------------------------------------------- in-place edits

def _set(param: nn.Parameter, value: Tensor, precise: bool = False) -> None:
    """param = value in param's dtype; `precise`: also keep value in fp32 beside a 16-bit param (see
    `precise_tensors`), and every later edit of that param starts from the fp32 copy."""
    param.data = value.to(param.dtype)
    if precise or hasattr(param, PRECISE_ATTR):
        if param.dtype in (torch.bfloat16, torch.float16):
            setattr(param, PRECISE_ATTR, value.to(torch.float32))


def _f64(t: Tensor) -> Tensor:
    return getattr(t, PRECISE_ATTR, t).detach().to(torch.float64)


def precise_tensors(model: nn.Module) -> dict[str, Tensor]:
    """{parameter name: its fp32 value} for the rotated tensors that stay floating point in the checkpoint
    (embedding, lm_head, the vision merger's last linear). A bf16 model holds them rounded to 8 bits; the
    exporter writes these fp32 values instead, rounded once to the checkpoint's dtype (an fp16 checkpoint
    keeps 3 more bits of them: measured on SmolLM2, KL 0.0042 -> 0.0036). Read once: the copies leave the model."""
    out = {name: getattr(p, PRECISE_ATTR) for name, p in model.named_parameters(remove_duplicate=False)
           if hasattr(p, PRECISE_ATTR)}
    for p in model.parameters():
        if hasattr(p, PRECISE_ATTR):
            delattr(p, PRECISE_ATTR)
    return out


def _linears(model: nn.Module, family: Family, rel: str) -> list[nn.Linear]:
    return [layer.get_submodule(rel) for layer in model.get_submodule(family.layers)]


def untie_lm_head(model: nn.Module, family: Family) -> bool:
    """Give lm_head its own weight if it shares the embedding's, and say so in the config. True if it did."""
    lm_head, embed = model.get_submodule(family.lm_head), model.get_submodule(family.embed)
    if lm_head.weight is not embed.weight and lm_head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    lm_head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


@torch.no_grad()
def fold_norm_gains(model: nn.Module, family: Family) -> None:
    """Every RMSNorm gain of the LM into the linears that read it (columns), the gains set to 1."""
    for layer in model.get_submodule(family.layers):
        for group in family.norm_groups:
            norm = layer.get_submodule(group.producer)
            gain = _f64(norm.weight)
            for rel in group.consumers:
                linear = layer.get_submodule(rel)
                _set(linear.weight, _f64(linear.weight) * gain)
            _set(norm.weight, torch.ones_like(gain))
    norm, lm_head = model.get_submodule(family.final_norm), model.get_submodule(family.lm_head)
    untie_lm_head(model, family)
    _set(lm_head.weight, _f64(lm_head.weight) * _f64(norm.weight), precise=True)
    _set(norm.weight, torch.ones_like(norm.weight))


@torch.no_grad()
def rotate_residual(model: nn.Module, family: Family, q: Tensor) -> None:
    """R1: the residual stream becomes Q h (norm gains must already be folded: `fold_norm_gains`)."""
    if not family.embed or not family.final_norm:
        raise RotationError(f"family {family.name} does not map its residual stream (embed, final norm)")
    if family.vision and not family.vision_out:
        raise RotationError(f"family {family.name}: the vision outputs that enter the residual stream are not "
                            "mapped, so a residual rotation would desynchronise image tokens")
    q = q.to(torch.float64)

    def read(linear: nn.Linear) -> None:
        _set(linear.weight, _f64(linear.weight) @ q.T.to(linear.weight.device))

    def write(linear: nn.Linear, precise: bool = False) -> None:
        qd = q.to(linear.weight.device)
        _set(linear.weight, qd @ _f64(linear.weight), precise)
        if linear.bias is not None:
            _set(linear.bias, qd @ _f64(linear.bias), precise)

    embed = model.get_submodule(family.embed)
    _set(embed.weight, _f64(embed.weight) @ q.T.to(embed.weight.device), precise=True)
    for path in family.vision_out:   # floating point in the checkpoint, like the embedding
        write(model.get_submodule(path), precise=True)
    readers = [rel for group in family.norm_groups for rel in group.consumers]
    for layer in model.get_submodule(family.layers):
        for rel in readers:
            read(layer.get_submodule(rel))
        for rel in family.residual_writers:
            write(layer.get_submodule(rel))
    read(model.get_submodule(family.lm_head))


def text_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(attention heads, kv heads, head dim) of the language model."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads, cfg.num_key_value_heads, head_dim


@torch.no_grad()
def rotate_values(model: nn.Module, family: Family, q2: Tensor) -> None:
    """R2: every head's values become Q2 v (v_proj rows per kv-head, o_proj columns per query head)."""
    if family.value_pair is None:
        raise RotationError(f"family {family.name} has no v_proj -> o_proj pair to rotate")
    heads, kv_heads, head_dim = text_geometry(model)
    v_rel, o_rel = family.value_pair
    for layer in model.get_submodule(family.layers):
        v, o = layer.get_submodule(v_rel), layer.get_submodule(o_rel)
        qd = q2.to(torch.float64).to(v.weight.device)
        w = _f64(v.weight).view(kv_heads, head_dim, -1)
        _set(v.weight, (qd @ w).reshape(v.weight.shape))
        if v.bias is not None:
            _set(v.bias, (_f64(v.bias).view(kv_heads, head_dim) @ qd.T).reshape(-1))
        w = _f64(o.weight).view(-1, heads, head_dim)
        _set(o.weight, (w @ qd.T.to(o.weight.device)).reshape(o.weight.shape))


def _input_hadamard_hook(module: nn.Module, args: tuple) -> tuple:
    return (block_hadamard(args[0], getattr(module, INPUT_HADAMARD_ATTR)), *args[1:])


@torch.no_grad()
def rotate_mlp_input(model: nn.Module, family: Family, block: int) -> list[str]:
    """R4: down_proj reads H x (block Hadamard, online) and holds W H. Returns the rotated linears' names."""
    if family.mlp_pair is None:
        raise RotationError(f"family {family.name} has no MLP output linear to rotate")
    down_rel = family.mlp_pair[1]
    names = []
    for i, layer in enumerate(model.get_submodule(family.layers)):
        down = layer.get_submodule(down_rel)
        if hasattr(down, INPUT_HADAMARD_ATTR):
            raise RotationError(f"{family.layers}.{i}.{down_rel} already has an input Hadamard")
        _set(down.weight, block_hadamard(_f64(down.weight), block))   # W H (H symmetric)
        setattr(down, INPUT_HADAMARD_ATTR, block)
        down.register_forward_pre_hook(_input_hadamard_hook)
        names.append(f"{family.layers}.{i}.{down_rel}")
    return names


def input_hadamards(model: nn.Module) -> dict[str, int]:
    """{module name: block size} of the modules with an online input Hadamard."""
    return {name: getattr(m, INPUT_HADAMARD_ATTR) for name, m in model.named_modules()
            if hasattr(m, INPUT_HADAMARD_ATTR)}
