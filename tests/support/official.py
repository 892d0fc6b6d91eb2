"""Functional forwards written the way the official code computes (hustvl/Vim ``models_mamba.py`` with
``mamba_inner_fn_no_out_proj``; MzeroMiko/VMamba ``forwardv0`` / ``forwardv2`` with the torch cross
scan), straight from a state dict and independent of the package's modules and scan. Used as the
oracle that the package's backbones compute what the official ones do."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scan_ref(u, delta, A, B, C, D, z=None, delta_bias=None):
    """mamba-ssm's ``selective_scan_ref`` algorithm with softplus; B, C (b, n, l) or (b, g, n, l)."""
    delta = F.softplus(delta + delta_bias[..., None])
    batch, dim, length = u.shape
    if B.dim() == 4:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
        delta_B_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    else:
        delta_B_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    delta_A = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    x = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for i in range(length):
        x = delta_A[:, :, i] * x + delta_B_u[:, :, i]
        c = C[:, :, :, i] if C.dim() == 4 else C[:, None, :, i]
        ys.append((x * c).sum(-1))
    out = torch.stack(ys, dim=2) + u * D[:, None]
    return out if z is None else out * F.silu(z)


def _rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _vim_inner(xz, sd, p, sfx):
    x, z = xz.chunk(2, dim=1)
    batch, dim, length = x.shape
    x = F.silu(
        F.conv1d(x, sd[f"{p}conv1d{sfx}.weight"], sd[f"{p}conv1d{sfx}.bias"], padding=3, groups=dim)[..., :length]
    )
    x_dbl = F.linear(x.permute(0, 2, 1).reshape(batch * length, dim), sd[f"{p}x_proj{sfx}.weight"])
    dt_w = sd[f"{p}dt_proj{sfx}.weight"]
    rank, nstate = dt_w.shape[1], (x_dbl.shape[1] - dt_w.shape[1]) // 2
    delta = (dt_w @ x_dbl[:, :rank].t()).view(dim, batch, length).permute(1, 0, 2)
    B = x_dbl[:, rank : rank + nstate].view(batch, length, nstate).permute(0, 2, 1)
    C = x_dbl[:, rank + nstate :].view(batch, length, nstate).permute(0, 2, 1)
    a_log = sd[f"{p}A_log"] if sfx == "" else sd[f"{p}A_b_log"]
    return scan_ref(x, delta, -torch.exp(a_log), B, C, sd[f"{p}D{sfx}"], z, sd[f"{p}dt_proj{sfx}.bias"])


def vim_forward(sd, images, stride):
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)
    batch, m, _ = x.shape
    token = m // 2
    x = torch.cat((x[:, :token], sd["cls_token"].expand(batch, -1, -1), x[:, token:]), dim=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    residual, hidden = None, x
    for i in range(depth):
        p = f"layers.{i}.mixer."
        residual = hidden if residual is None else residual + hidden
        h = _rms(residual, sd[f"layers.{i}.norm.weight"])
        length = h.shape[1]
        xz = (sd[f"{p}in_proj.weight"] @ h.reshape(-1, h.shape[-1]).t()).view(-1, batch, length).permute(1, 0, 2)
        out = _vim_inner(xz, sd, p, "")
        out_b = _vim_inner(xz.flip([-1]), sd, p, "_b")
        hidden = F.linear((out + out_b.flip(-1)).permute(0, 2, 1) / 2, sd[f"{p}out_proj.weight"])
    feature = _rms(residual + hidden, sd["norm_f.weight"])[:, token]
    return F.linear(feature, sd["head.weight"], sd["head.bias"])


def _ln(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"])


def _ss2d_core(x, sd, p, v0):
    batch, dim, height, width = x.shape
    length = height * width
    K, _, rank = sd[p + "dt_projs_weight"].shape
    nstate = sd[p + "A_logs"].shape[1]
    if v0:
        x_hwwh = torch.stack([x.view(batch, -1, length), x.transpose(2, 3).contiguous().view(batch, -1, length)], dim=1)
        xs = torch.cat([x_hwwh, torch.flip(x_hwwh, dims=[-1])], dim=1)
    else:
        xs = x.new_empty(batch, 4, dim, length)
        xs[:, 0] = x.flatten(2, 3)
        xs[:, 1] = x.transpose(2, 3).flatten(2, 3)
        xs[:, 2:4] = torch.flip(xs[:, 0:2], dims=[-1])
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, sd[p + "x_proj_weight"])
    dts, Bs, Cs = torch.split(x_dbl, [rank, nstate, nstate], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, sd[p + "dt_projs_weight"])
    out_y = scan_ref(
        xs.reshape(batch, -1, length),
        dts.reshape(batch, -1, length),
        -torch.exp(sd[p + "A_logs"]),
        Bs,
        Cs,
        sd[p + "Ds"],
        delta_bias=sd[p + "dt_projs_bias"].reshape(-1),
    ).view(batch, K, -1, length)
    if v0:
        inv_y = torch.flip(out_y[:, 2:4], dims=[-1]).view(batch, 2, -1, length)
        wh_y = out_y[:, 1].view(batch, -1, width, height).transpose(2, 3).contiguous().view(batch, -1, length)
        invwh_y = inv_y[:, 1].view(batch, -1, width, height).transpose(2, 3).contiguous().view(batch, -1, length)
        y = out_y[:, 0] + inv_y[:, 0] + wh_y + invwh_y
    else:
        y = out_y[:, 0:2] + out_y[:, 2:4].flip(dims=[-1]).view(batch, 2, dim, -1)
        y = y[:, 0] + y[:, 1].view(batch, -1, width, height).transpose(2, 3).contiguous().view(batch, dim, -1)
    return _ln(y.transpose(1, 2).reshape(batch, height, width, -1), sd, p + "out_norm")


def _ss2d(x, sd, p, v0):
    x = F.linear(x, sd[p + "in_proj.weight"])
    if v0:
        x, z = x.chunk(2, dim=-1)
    x = x.permute(0, 3, 1, 2)
    x = F.conv2d(x, sd[p + "conv2d.weight"], sd.get(p + "conv2d.bias"), padding=1, groups=x.shape[1])
    y = _ss2d_core(F.silu(x), sd, p, v0)
    if v0:
        y = y * F.silu(z)
    return F.linear(y, sd[p + "out_proj.weight"])


def vmamba_forward(sd, images, v0):
    if v0:
        x = F.conv2d(images, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=4).permute(0, 2, 3, 1)
        x = _ln(x, sd, "patch_embed.2")
    else:
        x = F.conv2d(images, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=2, padding=1)
        x = F.gelu(_ln(x.permute(0, 2, 3, 1), sd, "patch_embed.2").permute(0, 3, 1, 2))
        x = F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=2, padding=1)
        x = _ln(x.permute(0, 2, 3, 1), sd, "patch_embed.7")
    stages = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(stages):
        blocks = {int(k.split(".")[3]) for k in sd if k.startswith(f"layers.{i}.blocks.")}
        for j in sorted(blocks):
            p = f"layers.{i}.blocks.{j}."
            x = x + _ss2d(_ln(x, sd, p + "norm"), sd, p + "op.", v0)
            if p + "mlp.fc1.weight" in sd:
                h = F.gelu(F.linear(_ln(x, sd, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
                x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        d = f"layers.{i}.downsample."
        if d + "reduction.weight" in sd:
            x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
            x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
            x = F.linear(_ln(torch.cat([x0, x1, x2, x3], -1), sd, d + "norm"), sd[d + "reduction.weight"])
        elif d + "1.weight" in sd:
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[d + "1.weight"], sd[d + "1.bias"], stride=2, padding=1)
            x = _ln(x.permute(0, 2, 3, 1), sd, d + "3")
    x = _ln(x, sd, "classifier.norm").permute(0, 3, 1, 2)
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return F.linear(x, sd["classifier.head.weight"], sd["classifier.head.bias"])
